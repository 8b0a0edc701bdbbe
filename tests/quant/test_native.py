"""The native CPU kernels (jaxcomp/quant/kernels) against float64 numpy and XLA's lowering."""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import quant
from jaxcomp.quant import _native

DENSE = (((1,), (0,)), ((), ()))
ULP = 2.0**-23


def _require(kernel: str):
    """Skips only where the CPU lacks the instructions; a failed build is a failure."""
    status = _native.native_status()
    if getattr(status, kernel):
        return
    if "lacks" in status.reason or "no kernels for" in status.reason:
        pytest.skip(status.reason)
    pytest.fail(f"native kernels unavailable: {status.reason}")


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _xla(fn, *args, monkeypatch):
    """``fn(*args)`` through XLA's own lowering (native kernels off for this trace)."""
    with monkeypatch.context() as m:
        m.setenv("JAXCOMP_NATIVE", "0")
        return jax.jit(fn)(*args)


def _w8a8_numpy(x, codes, scale):
    """Per-token int8 codes in float32 arithmetic, an int64 dot, the float32 rescale."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(1, keepdims=True)
    s_a = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    a = np.round(np.clip(x / s_a, -127, 127)).astype(np.int64)  # numpy rounds half to even
    acc = a @ np.asarray(codes, np.int64)
    return acc.astype(np.float32) * (s_a * np.asarray(scale, np.float32).reshape(1, -1))


# --- the build --------------------------------------------------------------------------------


def test_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    _require("lowbit")
    compiler = _native._compiler()
    first = _native._build(compiler)
    assert first.exists() and _native._build(compiler) == first  # second call: the cached file

    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'fatal: no such intrinsic' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("JAXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="compiling the jaxcomp kernels failed"):
        _native._build(str(broken))
    assert os.listdir(tmp_path / "cache") == []  # no half-written library
    # a failed build is said once, then XLA runs: the status carries the compiler's words
    monkeypatch.setattr(_native, "_compiler", lambda: str(broken))
    with pytest.warns(UserWarning, match="native kernels are off"):
        status = _native._load.__wrapped__()
    assert (status.w8a8, status.lowbit) == (False, False)
    assert "no such intrinsic" in status.reason


def test_disabled_by_environment_uses_xla(rng, monkeypatch):
    x = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
    q = quant.quantize(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), bits=8)
    monkeypatch.setenv("JAXCOMP_NATIVE", "0")
    status = _native.native_status()
    assert (status.w8a8, status.lowbit) == (False, False)
    assert "JAXCOMP_NATIVE=0" in status.reason
    text = _hlo(lambda x, q: quant.w8a8_dot_general(x, q, DENSE), x, q)
    assert "jaxcomp_w8a8_matmul" not in text


# --- W8A8 on AMX ------------------------------------------------------------------------------


@pytest.mark.parametrize("m, k, n", [(1, 64, 64), (3, 70, 45), (33, 130, 77), (64, 256, 200)])
def test_w8a8_matches_numpy_and_xla(rng, monkeypatch, m, k, n):
    _require("w8a8")
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    x = x.at[0].set(0.0)  # an all-zero token: scale 1, exact zeros
    q = quant.quantize(jnp.asarray(rng.normal(size=(k, n)), jnp.float32), bits=8)

    def f(x, q):
        return quant.w8a8_dot_general(x, q, DENSE)

    assert 'custom_call_target="jaxcomp_w8a8_matmul"' in _hlo(f, x, q)
    y = np.asarray(jax.jit(f)(x, q))
    ref = _w8a8_numpy(x, q.codes, q.scale)
    # numpy's codes (true division) and exact int32 sums; the rescale rounds twice: <= 2 ulp.
    # One code off by one would move y by s_a * s_w * |w|, thousands of ulp.
    np.testing.assert_allclose(y, ref, rtol=2 * ULP, atol=0)
    assert np.all(y[0] == 0)
    np.testing.assert_allclose(y, _xla(f, x, q, monkeypatch=monkeypatch), rtol=2 * ULP, atol=0)


def test_w8a8_einsum_kernel_batched_tokens_bf16_and_float_weights(rng, monkeypatch):
    _require("w8a8")
    w = jnp.asarray(rng.normal(size=(4, 16, 96)), jnp.float32)  # [heads, head_dim, out]
    q = quant.quantize(w, bits=8)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 16)), jnp.float32)  # [batch, t, heads, head_dim]
    dims = (((2, 3), (0, 1)), ((), ()))

    def f(x, w):
        return quant.w8a8_dot_general(x, w, dims)

    for operand in (q, w):  # a QArray, or float weights quantized per output channel here
        assert "jaxcomp_w8a8_matmul" in _hlo(f, x, operand)
        y = jax.jit(f)(x, operand)
        assert y.shape == (2, 5, 96)
        ref = _xla(f, x, operand, monkeypatch=monkeypatch)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2 * ULP, atol=0)
    y16 = jax.jit(f)(x.astype(jnp.bfloat16), q)
    assert y16.dtype == jnp.bfloat16
    ref16 = _xla(f, x.astype(jnp.bfloat16), q, monkeypatch=monkeypatch)
    y16, ref16 = np.asarray(y16, np.float32), np.asarray(ref16, np.float32)
    np.testing.assert_allclose(y16, ref16, rtol=0.01)


def test_w8a8_vmap_gradient_mesh_and_pmap(rng, monkeypatch):
    _require("w8a8")
    x = jnp.asarray(rng.normal(size=(8, 16, 128)), jnp.float32)
    q = quant.quantize(jnp.asarray(rng.normal(size=(128, 64)), jnp.float32), bits=8)

    def f(x, q):
        return quant.w8a8_dot_general(x, q, DENSE)

    whole = np.asarray(jax.jit(jax.vmap(f, in_axes=(0, None)))(x, q))
    np.testing.assert_array_equal(whole[3], np.asarray(jax.jit(f)(x[3], q)))

    g = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    loss = lambda x, q: jnp.sum(f(x, q) * g)  # noqa: E731
    dx = jax.jit(jax.grad(loss))(x[0], q)
    np.testing.assert_allclose(dx, _xla(jax.grad(loss), x[0], q, monkeypatch=monkeypatch))

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    sharded = jax.jit(jax.vmap(f, in_axes=(0, None)))(xs, q)
    np.testing.assert_array_equal(np.asarray(sharded), whole)
    pmapped = jax.pmap(f, in_axes=(0, None))(x, q)
    np.testing.assert_array_equal(np.asarray(pmapped), whole)


# --- weight-only on AVX-512 -------------------------------------------------------------------


def _bound(x, q):
    """float32 sums of k products, any order: |error| <= k ulp of sum |x||w| (and rounding
    of the per-group scale products), a loose but honest envelope."""
    w = np.abs(np.asarray(q.dequantize(), np.float64))
    k = w.shape[0]
    return (k + 8) * ULP * (np.abs(np.asarray(x, np.float64)) @ w)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=4, group_size=128),
        dict(bits=4),
        dict(bits=3, group_size=64, symmetric=False),
        dict(bits=2, group_size=32),
        dict(bits=8),
        dict(bits=6, group_size=128, symmetric=False),
    ],
)
@pytest.mark.parametrize("tokens", [1, 5, 32])
def test_weight_only_matches_float64(rng, kwargs, tokens):
    _require("lowbit")
    k, n = 256, 200  # 200 = three 64-column panels and a ragged tail of 8
    q = quant.quantize(jnp.asarray(rng.normal(size=(k, n)), jnp.float32), **kwargs)
    x = jnp.asarray(rng.normal(size=(tokens, k)), jnp.float32)

    def f(x, q):
        return quant.weight_only_dot_general(x, q, DENSE)

    assert 'custom_call_target="jaxcomp_lowbit_matmul"' in _hlo(f, x, q)
    y = np.asarray(jax.jit(f)(x, q), np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    assert np.all(np.abs(y - ref) <= _bound(x, q))


def test_weight_only_routing(rng):
    """Native for integer codes and up to 32 tokens; XLA for more tokens and other formats."""
    _require("lowbit")
    w = jnp.asarray(rng.normal(size=(256, 128)), jnp.float32)

    def f(x, q):
        return quant.weight_only_dot_general(x, q, DENSE)

    int4 = quant.quantize(w, bits=4, group_size=64)
    assert "jaxcomp_lowbit_matmul" in _hlo(f, jnp.ones((32, 256)), int4)
    assert "jaxcomp_lowbit_matmul" not in _hlo(f, jnp.ones((33, 256)), int4)
    for other in (dict(bits=4, fmt="nf4"), dict(bits=8, fmt="fp8_e4m3"), dict(channel_axis=None)):
        q = quant.quantize(w, **({"bits": 4} | other))
        assert "jaxcomp_lowbit_matmul" not in _hlo(f, jnp.ones((2, 256)), q)


def test_weight_only_gradient_bf16_einsum_and_mesh(rng, monkeypatch):
    _require("lowbit")
    q = quant.quantize(jnp.asarray(rng.normal(size=(8, 32, 96)), jnp.float32), bits=4)
    x = jnp.asarray(rng.normal(size=(3, 8, 32)), jnp.float32)
    dims = (((1, 2), (0, 1)), ((), ()))

    def f(x, q):
        return quant.weight_only_dot_general(x, q, dims)

    assert "jaxcomp_lowbit_matmul" in _hlo(f, x, q)
    w64 = np.asarray(q.dequantize(), np.float64)
    ref = np.einsum("tab,abn->tn", np.asarray(x, np.float64), w64)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, q)), ref, rtol=1e-5, atol=1e-4)

    g = jnp.asarray(rng.normal(size=(3, 96)), jnp.float32)
    loss = lambda x, q: jnp.sum(f(x, q) * g)  # noqa: E731
    dx = jax.jit(jax.grad(loss))(x, q)
    np.testing.assert_allclose(dx, _xla(jax.grad(loss), x, q, monkeypatch=monkeypatch), rtol=1e-6)

    x16 = x.astype(jnp.bfloat16)
    y16 = jax.jit(f)(x16, q)
    assert y16.dtype == jnp.bfloat16
    ref16 = np.einsum("tab,abn->tn", np.asarray(x16, np.float64), np.asarray(q.dequantize()))
    # float32 sums of the bf16 inputs, then one bf16 rounding of the result (2^-9 relative)
    np.testing.assert_allclose(np.asarray(y16, np.float64), ref16, rtol=2.0**-8, atol=1e-4)

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    xs = jnp.asarray(rng.normal(size=(8, 8, 32)), jnp.float32)
    sharded = jax.device_put(xs, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_allclose(
        np.asarray(jax.jit(f)(sharded, q)), np.asarray(jax.jit(f)(xs, q)), rtol=1e-6, atol=1e-6
    )


# --- prepacked weights (layout="amx") -----------------------------------------------------------


def test_amx_layout_places_every_code_and_round_trips(rng):
    from jaxcomp.quant import _layout

    k, n = 130, 70  # padded to 192 x 96
    codes = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    tiles = np.asarray(jax.jit(_layout.to_amx)(jnp.asarray(codes)))
    assert tiles.shape == (3, 192 * 32)
    kk, nn = np.meshgrid(np.arange(k), np.arange(n), indexing="ij")
    # slice n // 32, k-block k // 64, tile (n % 32) // 16, row (k % 64) // 4, column n % 16, k % 4
    offset = (kk // 64) * 2048 + ((nn % 32) // 16) * 1024 + ((kk % 64) // 4) * 64
    offset += (nn % 16) * 4 + kk % 4
    np.testing.assert_array_equal(tiles[nn // 32, offset], codes)
    assert np.count_nonzero(tiles) == np.count_nonzero(codes)  # the padding is zeros
    np.testing.assert_array_equal(np.asarray(_layout.from_amx(jnp.asarray(tiles), k, n)), codes)


def test_prepack_keeps_values_and_converts_only_the_w8a8_kind(rng):
    w = jnp.asarray(rng.normal(size=(96, 40)), jnp.float32)
    tree = {
        "w8": quant.quantize(w, bits=8),
        "w4": quant.quantize(w, bits=4, group_size=32),
        "asym": quant.quantize(w, bits=8, symmetric=False),
        "bias": jnp.ones(40),
    }
    packed = jax.jit(quant.prepack)(tree)
    assert packed["w8"].layout == "amx"
    assert [packed[k].layout for k in ("w4", "asym")] == ["rows", "rows"]
    np.testing.assert_array_equal(packed["w8"].dequantize(), tree["w8"].dequantize())
    back = quant.prepack(packed, "rows")["w8"]
    assert back.layout == "rows"
    np.testing.assert_array_equal(back.codes, tree["w8"].codes)
    with pytest.raises(ValueError, match="layout is 'vnni'"):
        quant.prepack(tree, "vnni")
    with pytest.raises(ValueError, match="bits=4"):
        quant.QArray(**{**vars(tree["w4"]), "layout": "amx"})


def test_prepacked_w8a8_equals_unpacked_native_and_xla(rng, monkeypatch):
    _require("w8a8")
    w = jnp.asarray(rng.normal(size=(200, 300)), jnp.float32)  # ragged: 256 x 320 in tiles
    q = quant.quantize(w, bits=8)
    packed = quant.prepack(q)
    x = jnp.asarray(rng.normal(size=(3, 7, 200)), jnp.float32)

    def f(x, q):
        return quant.w8a8_dot_general(x, q, (((2,), (0,)), ((), ())))

    text = _hlo(f, x, packed)
    assert "jaxcomp_w8a8_matmul" in text and "transpose" not in text  # read in place
    y = np.asarray(jax.jit(f)(x, packed))
    np.testing.assert_array_equal(y, np.asarray(jax.jit(f)(x, q)))  # same kernel arithmetic
    np.testing.assert_allclose(y, _xla(f, x, packed, monkeypatch=monkeypatch), rtol=2 * ULP)
    # the weight-only path and a checkpoint both take the prepacked form
    wo = jax.jit(lambda x, q: quant.weight_only_dot_general(x, q, (((2,), (0,)), ((), ()))))
    x2d = x.reshape(-1, 200)
    ref = np.asarray(x2d, np.float64) @ np.asarray(q.dequantize(), np.float64)
    for weight in (packed, q):
        got = np.asarray(wo(x, weight), np.float64).reshape(ref.shape)
        assert np.all(np.abs(got - ref) <= _bound(x2d, q))


def test_prepacked_weights_checkpoint_round_trip(rng, tmp_path):
    from jaxcomp import checkpoint

    q = quant.prepack(quant.quantize(jnp.asarray(rng.normal(size=(64, 48)), jnp.float32), bits=8))
    checkpoint.save(tmp_path / "ckpt", {"kernel": q})
    back = checkpoint.restore(tmp_path / "ckpt")["kernel"]
    assert back.layout == "amx"
    np.testing.assert_array_equal(back.codes, q.codes)
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())


def test_quantized_apply_runs_a_stock_model_on_prepacked_params(rng):
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(96), nn.relu, nn.Dense(10)])
    x = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
    qparams = quant.quantize_tree(model.init(jax.random.key(0), x)["params"])
    packed = quant.prepack(qparams)
    is_q = lambda v: isinstance(v, quant.QArray)  # noqa: E731
    assert [q.layout for q in jax.tree.leaves(packed, is_leaf=is_q) if is_q(q)] == ["amx", "amx"]

    def run(p, x):
        return quant.quantized_apply(model, {"params": p}, x, mode="w8a8")

    np.testing.assert_allclose(jax.jit(run)(packed, x), jax.jit(run)(qparams, x), rtol=1e-6)
