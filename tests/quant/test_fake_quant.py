"""fake_quant: forward equals quantize-dequantize, backward is the clipped STE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.quant import dequantize, fake_quant, quantize
from tests.quant import _reference as ref

CONFIGS = [
    dict(bits=8),
    dict(bits=4, group_size=16, symmetric=False),
    dict(bits=3, channel_axis=None, calibration="percentile", percentile=95.0),
    dict(bits=4, group_size=8, calibration="percentile", percentile=90.0, symmetric=False),
    dict(bits=2, calibration="mse"),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forward_equals_quantize_dequantize(rng, kwargs):
    x = rng.standard_normal((32, 8)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(fake_quant(x, **kwargs)), np.asarray(dequantize(quantize(x, **kwargs)))
    )


def _expected_mask(
    x, bits, channel_axis=-1, group_size=None, symmetric=True, calibration="absmax", percentile=99.9
):
    """1 where round(x / s) + z lies on the grid (not clipped), from float64 scales."""
    xg = ref.grouped(ref.matrix_view(x, channel_axis), group_size)
    lo, hi = ref.clip_range(xg, symmetric, calibration, percentile)
    scale, zero = ref.params_from_range(lo, hi, bits, symmetric)
    q = np.round(xg / scale[:, None, :]) + (0 if zero is None else zero[:, None, :])
    qmin, qmax = ref.grid(bits)
    inside = ((q >= qmin) & (q <= qmax)).reshape(-1, xg.shape[-1])
    if channel_axis is None:
        return inside.reshape(x.shape)
    return np.moveaxis(inside.reshape(np.moveaxis(x, channel_axis, -1).shape), -1, channel_axis)


@pytest.mark.parametrize("kwargs", CONFIGS[:4])
def test_gradient_is_clipped_straight_through(rng, kwargs):
    x = rng.standard_normal((32, 8)).astype(np.float32)
    x[0, 0], x[1, 5] = 9.0, -7.0  # outliers that percentile calibration clips
    upstream = rng.standard_normal((32, 8)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fake_quant(x, **kwargs) * upstream)))(x)
    mask = _expected_mask(x, **kwargs)
    if kwargs.get("calibration") == "percentile":
        assert not mask[0, 0] and 0 < mask.sum() < mask.size
    else:
        assert mask.all()
    np.testing.assert_array_equal(np.asarray(grad), np.where(mask, upstream, 0.0))
    # The VJP directly: the cotangent passes through exactly where the value was not clipped.
    _, vjp = jax.vjp(lambda x: fake_quant(x, **kwargs), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.ones_like(x))[0]), mask.astype(np.float32))


def test_jit_bfloat16_and_no_recompile(rng):
    traces = []

    @functools.partial(jax.jit, static_argnames=("bits",))
    def step(x, bits):
        traces.append(1)
        return jax.value_and_grad(lambda x: jnp.sum(fake_quant(x, bits, group_size=4) ** 2))(x)

    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16)
    value, grad = step(x, 4)
    assert grad.dtype == jnp.bfloat16 and fake_quant(x, 4).dtype == jnp.bfloat16
    x_hat = fake_quant(x, 4, group_size=4)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(2 * x_hat))
    step(x * 2, 4)
    assert len(traces) == 1


def test_pmap_data_parallel_matches_single_device(rng):
    x = rng.standard_normal((8, 16, 4)).astype(np.float32)
    x[:, 0, 0] = 6.0

    def loss_grad(x):
        return jax.grad(
            lambda x: jnp.sum(fake_quant(x, 4, calibration="percentile", percentile=90.0) ** 2)
        )(x)

    got = jax.pmap(loss_grad)(x)
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(jax.jit(loss_grad)(x[i])))
    assert float(jnp.sum(got[:, 0, 0] != 0)) == 0.0  # the clipped outlier gets no gradient


def test_errors():
    with pytest.raises(TypeError, match="floating-point"):
        fake_quant(jnp.arange(4))
    with pytest.raises(ValueError, match="bits is 12"):
        fake_quant(jnp.ones((4, 4)), 12)
    with pytest.raises(ValueError, match="group_size 3 does not divide"):
        fake_quant(jnp.ones((4, 4)), group_size=3)
