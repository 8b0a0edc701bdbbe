"""Weight-only dot, XLA's lowering: the blocked (scan) form against dequantize-then-dot in
float64. The native kernel that replaces it on CPUs with AVX-512 is tested in test_native.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import quant

DENSE = (((1,), (0,)), ((), ()))
K, N = 1024, 1152  # float32 weight of 4.5 MiB: large enough for the blocked form


@pytest.fixture(autouse=True)
def _xla_lowering(monkeypatch):
    monkeypatch.setenv("JAXCOMP_NATIVE", "0")


def _ref(x, q):
    return np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)


def _uses_scan(fn, *args) -> bool:
    return "while" in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=4, group_size=128),
        dict(bits=4),
        dict(bits=3, group_size=64, symmetric=False),
        dict(bits=2, group_size=32),
        dict(bits=4, group_size=128, fmt="nf4"),
        dict(bits=8),
        dict(bits=8, group_size=128, symmetric=False),
        dict(bits=8, fmt="fp8_e4m3"),
    ],
)
def test_blocked_matches_dequantize_then_dot(rng, kwargs):
    w = jnp.asarray(rng.normal(size=(K, N)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, K)), jnp.float32)
    q = quant.quantize(w, **kwargs)

    def f(x, q):
        return quant.weight_only_dot_general(x, q, DENSE)

    assert _uses_scan(f, x, q)
    y = np.asarray(jax.jit(f)(x, q), np.float64)
    ref = _ref(x, q)
    # float32 summation of K = 1024 products in another order: relative 1e-6 of the scale
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_small_weight_uses_one_dot_and_per_tensor_too(rng):
    x = jnp.asarray(rng.normal(size=(2, 256)), jnp.float32)
    q_small = quant.quantize(jnp.asarray(rng.normal(size=(256, 64)), jnp.float32), bits=4)
    q_tensor = quant.quantize(
        jnp.asarray(rng.normal(size=(K, N)), jnp.float32), bits=4, channel_axis=None
    )

    def f(x, q):
        return quant.weight_only_dot_general(x, q, DENSE)

    assert not _uses_scan(f, x, q_small)
    xt = jnp.asarray(rng.normal(size=(2, K)), jnp.float32)
    assert not _uses_scan(f, xt, q_tensor)  # per-tensor: [K * N, 1] view, not blockable
    q = quant.quantize(jnp.asarray(rng.normal(size=(K, N)), jnp.float32), bits=4, group_size=128)
    # blocks of 256 rows, 2 codes per byte: blocked up to 4 * 256 / 2 = 512 tokens
    assert _uses_scan(f, jax.ShapeDtypeStruct((512, K), jnp.float32), q)
    assert not _uses_scan(f, jax.ShapeDtypeStruct((513, K), jnp.float32), q)
    np.testing.assert_allclose(np.asarray(f(x, q_small)), _ref(x, q_small), rtol=1e-5, atol=1e-5)


def test_einsum_kernel_batch_axes_and_channel_axis_first(rng):
    w = jnp.asarray(rng.normal(size=(32, 32, N)), jnp.float32)  # [a, b, out], contract a, b
    q = quant.quantize(w, bits=4, group_size=128)
    x = jnp.asarray(rng.normal(size=(2, 32, 3, 32)), jnp.float32)  # [batch, a, t, b]
    dims = (((1, 3), (0, 1)), ((), ()))
    y = jax.jit(lambda x, q: quant.weight_only_dot_general(x, q, dims))(x, q)
    ref = np.einsum(
        "zatb,abn->ztn", np.asarray(x, np.float64), np.asarray(q.dequantize(), np.float64)
    )
    assert y.shape == (2, 3, N)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max())

    wt = jnp.asarray(rng.normal(size=(N, K)), jnp.float32)  # [out, in], scales per row
    qt = quant.quantize(wt, bits=4, channel_axis=0, group_size=128)
    xt = jnp.asarray(rng.normal(size=(3, K)), jnp.float32)
    f = lambda x, q: quant.weight_only_dot_general(x, q, (((1,), (1,)), ((), ())))  # noqa: E731
    assert _uses_scan(f, xt, qt)
    ref = np.asarray(xt, np.float64) @ np.asarray(qt.dequantize(), np.float64).T
    np.testing.assert_allclose(np.asarray(f(xt, qt)), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_bfloat16_activations_and_gradient(rng):
    w = jnp.asarray(rng.normal(size=(K, N)), jnp.float32)
    q = quant.quantize(w, bits=4, group_size=128)
    x = jnp.asarray(rng.normal(size=(4, K)), jnp.float32)
    y16 = quant.weight_only_dot_general(x.astype(jnp.bfloat16), q, DENSE)
    assert y16.dtype == jnp.bfloat16
    w16 = q.dequantize().astype(jnp.bfloat16).astype(jnp.float32)
    ref = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64) @ np.asarray(w16)
    # bf16 weights, float32 accumulation, one bf16 rounding of the output (2^-8 relative)
    np.testing.assert_allclose(
        np.asarray(y16, np.float64), ref, rtol=2**-8, atol=1e-3 * np.abs(ref).max()
    )
    g = jnp.asarray(rng.normal(size=(4, N)), jnp.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(quant.weight_only_dot_general(x, q, DENSE) * g)))(x)
    ref_dx = np.asarray(g, np.float64) @ np.asarray(q.dequantize(), np.float64).T
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=0, atol=2e-6 * np.abs(ref_dx).max())


def test_blocked_on_8_device_mesh_with_sharded_batch(rng):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    w = jnp.asarray(rng.normal(size=(K, N)), jnp.float32)
    q = quant.quantize(w, bits=4, group_size=128)
    x = jax.device_put(
        jnp.asarray(rng.normal(size=(8, K)), jnp.float32),
        NamedSharding(mesh, PartitionSpec("data")),
    )
    y = jax.jit(lambda x, q: quant.weight_only_dot_general(x, q, DENSE))(x, q)
    ref = _ref(x, q)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
