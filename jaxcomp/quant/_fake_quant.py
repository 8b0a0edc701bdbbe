"""Fake quantization for quantization-aware training: quantize-dequantize with a clipped STE."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import _calibrate, _layout
from jaxcomp.quant._config import QuantConfig
from jaxcomp.quant._quantize import check_input


def fake_quant(
    x: ArrayLike,
    bits: int = 8,
    *,
    channel_axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
    fmt: str = "int",
) -> jax.Array:
    """Quantizes and dequantizes ``x`` in the forward pass; clipped straight-through backward.

    The forward value is ``dequantize(quantize(x, ...))`` with the same grid,
    granularity and calibration as :func:`quantize` (scales are computed from
    ``x`` and treated as constants). The gradient is the clipped straight-through
    estimator:

    .. math::

        \\frac{\\partial L}{\\partial x} = \\frac{\\partial L}{\\partial \\hat{x}}
        \\cdot \\mathbb{1}\\left[q_{min} \\le \\mathrm{round}(x / s) + z \\le q_{max}\\right]

    i.e. 1 where the value was not clipped and 0 where it was (with the default
    absmax calibration nothing is clipped, so the gradient passes unchanged).

    Args:
      x: float array.
      bits, channel_axis, group_size, symmetric, calibration, percentile, fmt: as in
        :func:`quantize`.

    Returns:
      An array of ``x``'s shape and dtype holding values on the quantization grid.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([0.1, -0.6, 1.0])
      >>> fake_quant(x, bits=4, channel_axis=None)
      Array([ 0.14285715, -0.5714286 ,  1.        ], dtype=float32)
      >>> jax.grad(lambda x: fake_quant(x, bits=4, channel_axis=None).sum())(x)
      Array([1., 1., 1.], dtype=float32)

    References:
      Bengio et al., Estimating or Propagating Gradients Through Stochastic
      Neurons for Conditional Computation, 2013.
    """
    config = QuantConfig(bits, channel_axis, group_size, symmetric, calibration, percentile, fmt)
    x, config = check_input(x, config)
    return _fake_quant_jit(x, config)


def _forward(x: jax.Array, config: QuantConfig):
    """Fake-quantized values and the mask of unclipped entries."""
    xg = _calibrate.group_view(jax.lax.stop_gradient(x), config.channel_axis, config.group_size)
    scale, zero = _calibrate.grouped_params(xg, config)
    inside = _calibrate.in_range(xg, scale, zero, config)
    x_hat = _calibrate.from_grid(_calibrate.to_grid(xg, scale, zero, config), scale, zero)

    def back(a):
        return _layout.from_2d(a.reshape(-1, a.shape[-1]), x.shape, config.channel_axis)

    return back(x_hat).astype(x.dtype), back(inside)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quant(x: jax.Array, config: QuantConfig) -> jax.Array:
    return _forward(x, config)[0]


def _fake_quant_fwd(x, config):
    return _forward(x, config)  # residual: the mask of unclipped entries


def _fake_quant_bwd(config, inside, g):
    del config
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
_fake_quant_jit = jax.jit(_fake_quant, static_argnums=(1,))
