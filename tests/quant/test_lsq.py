"""lsq_fake_quant: forward and LSQ gradients against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxcomp.quant import lsq_fake_quant


def _reference(x, s, g_out, bits, signed, grad_scale):
    """Forward, dL/dx and dL/ds of Esser et al. (2020) in float64, s broadcast to x."""
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    v = x / s
    out = np.round(np.clip(v, -q_n, q_p)) * s
    inside = (v >= -q_n) & (v <= q_p)
    dx = np.where(inside, g_out, 0.0)
    dv = np.where(v < -q_n, -q_n, np.where(v > q_p, q_p, np.round(v) - v))
    if grad_scale is None:
        grad_scale = 1.0 / np.sqrt(x.size / np.size(s) * q_p)
    return out, dx, g_out * dv * grad_scale, inside


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scale_shape", [(), (1, 6), (4, 1, 6)])
def test_forward_and_gradients_match_reference(rng, bits, signed, scale_shape):
    x = (rng.standard_normal((4, 16, 6)) * 0.3 * 2**bits).astype(np.float32)
    s = rng.uniform(0.05, 0.6, size=scale_shape).astype(np.float32)
    g_out = rng.standard_normal(x.shape).astype(np.float32)

    @jax.jit
    def run(x, s):
        out, vjp = jax.vjp(lambda x, s: lsq_fake_quant(x, s, bits, signed=signed), x, s)
        return out, *vjp(g_out)

    out, dx, ds = run(x, s)
    x64, s64 = x.astype(np.float64), s.astype(np.float64)
    out_ref, dx_ref, ds_full, inside = _reference(
        x64, s64, g_out.astype(np.float64), bits, signed, None
    )
    assert 0 < inside.sum() < inside.size  # both regimes are exercised
    # Forward: round(clip(x / s)) * s; float32 division and product stay within 1 ulp.
    np.testing.assert_allclose(np.asarray(out), out_ref, rtol=2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(dx), dx_ref.astype(np.float32))
    axes = tuple(
        i
        for i in range(3)
        if i < 3 - len(scale_shape) or scale_shape[i - 3 + len(scale_shape)] == 1
    )
    ds_ref = ds_full.sum(axis=axes).reshape(scale_shape)
    assert ds.shape == scale_shape
    # float32 sums of up to 384 terms of size <= 2^7: absolute error well under 1e-4 of the scale.
    np.testing.assert_allclose(np.asarray(ds), ds_ref, rtol=1e-4, atol=1e-5)


def test_saturated_region_gradients_are_exact_derivatives():
    # Outside the grid x_hat = Q_P * s or -Q_N * s: d/dx = 0 and d/ds = Q_P / -Q_N exactly,
    # which is what LSQ returns there (with g = 1), so finite differences must agree.
    x = jnp.array([[5.0, -9.0], [7.0, -6.5]], jnp.float32)
    s = jnp.array([[0.5, 0.7]], jnp.float32)
    check_grads(
        lambda x, s: lsq_fake_quant(x, s, 3, grad_scale=1.0),
        (x, s),
        order=1,
        modes=("rev",),
        eps=1e-3,
    )


def test_training_step_under_jit_bfloat16_and_errors(rng):
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.bfloat16)
    s = jnp.full((1, 8), 0.1, jnp.float32)
    loss = jax.jit(
        jax.value_and_grad(
            lambda s: jnp.mean((lsq_fake_quant(x, s, 4) - x) ** 2),
        )
    )
    value, ds = loss(s)
    assert ds.dtype == jnp.float32 and ds.shape == (1, 8) and np.all(np.isfinite(np.asarray(ds)))
    assert lsq_fake_quant(x, s, 4).dtype == jnp.bfloat16
    # A few SGD steps on the step size reduce the quantization error.
    for _ in range(20):
        _, ds = loss(s)
        s = s - 0.5 * ds
    assert float(loss(s)[0]) < float(value)
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) does not broadcast"):
        lsq_fake_quant(jnp.ones((4, 8)), jnp.ones(3))
    with pytest.raises(ValueError, match="bits is 1"):
        lsq_fake_quant(jnp.ones(4), jnp.ones(()), 1)
    with pytest.raises(TypeError, match="floating-point scale"):
        lsq_fake_quant(jnp.ones(4), jnp.ones((), jnp.int32))
