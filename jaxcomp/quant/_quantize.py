"""Round-to-nearest quantization of one tensor to a ``QArray`` and back."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import _calibrate, _layout
from jaxcomp.quant._config import QuantConfig
from jaxcomp.quant._qarray import QArray


def quantize(
    x: ArrayLike,
    bits: int = 8,
    *,
    channel_axis: int | None = -1,
    group_size: int | None = None,
    symmetric: bool = True,
    calibration: str = "absmax",
    percentile: float = 99.9,
    fmt: str = "int",
) -> QArray:
    """Quantizes a float tensor to ``bits``-bit integer codes with per-channel/group scales.

    Symmetric mode uses the signed grid ``[-2^(b-1), 2^(b-1) - 1]`` with
    ``s = a / (2^(b-1) - 1)``, where ``a`` is the clipping bound (``max |x|`` for
    absmax calibration), so ``-2^(b-1)`` is never produced by an unclipped value.
    Asymmetric mode maps ``[lo, hi]`` (clamped to contain 0, so that 0 is exactly
    representable) onto the whole grid:

    .. math::

        q = \\mathrm{clip}(\\mathrm{round}(x / s) + z, q_{min}, q_{max}), \\quad
        s = \\frac{hi - lo}{2^b - 1}, \\quad z = q_{min} - \\mathrm{round}(lo / s)

    and :func:`dequantize` returns ``(q - z) s``. Rounding is half to even. A
    channel or group whose range is 0 gets ``s = 1`` (so zeros come back exactly).
    Scales are shared along the contraction axes: per output column for
    ``channel_axis=-1`` on a Flax kernel ``[in, out]``, per ``group_size``
    consecutive rows of the flattened contraction axes with groups (conv kernels
    ``[h, w, in, out]`` are seen as ``[h * w * in, out]``), or one for the whole
    tensor with ``channel_axis=None`` (groups then run over the flattened tensor).

    Works under ``jax.jit`` (all arguments but ``x`` are static). Called eagerly,
    it raises ``ValueError`` on NaN or Inf input; under ``jit`` it cannot look at
    values, so NaN/Inf give meaningless codes (:func:`quantize_tree` checks every
    leaf eagerly and names it).

    Args:
      x: floating-point array of any shape and float dtype.
      bits: code width, 2 to 8; 2-4 bit codes are packed into ``uint8``.
      channel_axis: axis with one scale per entry, or ``None`` for per tensor.
      group_size: rows sharing one scale; must divide the number of rows of the
        matrix view (``in`` for a Dense kernel), else ``ValueError``.
      symmetric: zero point 0 (``True``) or affine with a zero point.
      calibration: ``"absmax"``/``"minmax"`` (full range), ``"percentile"`` or
        ``"mse"``; see :class:`QuantConfig`.
      percentile: the percentile for ``calibration="percentile"``.
      fmt: ``"int"``, or ``"fp8_e4m3"``/``"fp8_e5m2"`` (with ``bits=8``) or
        ``"nf4"`` (with ``bits=4``): codes on those grids times a symmetric scale
        ``s = a / max_grid`` (448, 57344 and 1); values round to the nearest grid
        value and saturate.

    Returns:
      A :class:`QArray`.

    Raises:
      TypeError: ``x`` is not floating point, or an argument has the wrong type.
      ValueError: a bad ``bits``/``group_size``/``calibration``/``channel_axis``,
        or NaN/Inf values seen eagerly.

    References:
      Jacob et al., Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference, 2018.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize(jnp.array([[1.0, -2.0], [0.5, 4.0]]), bits=8)
      >>> q.codes
      Array([[127, -64],
             [ 64, 127]], dtype=int8)
      >>> dequantize(q)
      Array([[ 1.      , -2.015748],
             [ 0.503937,  4.      ]], dtype=float32)
    """
    config = QuantConfig(bits, channel_axis, group_size, symmetric, calibration, percentile, fmt)
    x, config = check_input(x, config)
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"quantize got NaN or Inf values in an array of shape {x.shape}")
    return quantize_checked(x, config)


def check_input(x: ArrayLike, config: QuantConfig) -> tuple[jax.Array, QuantConfig]:
    """Validates ``x`` against ``config``; returns it as an array and the axis normalised."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config is {config!r}; expected a QuantConfig")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating-point array; got dtype {x.dtype}")
    axis = config.channel_axis
    if axis is not None:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(
                f"channel_axis is {axis} for an array of shape {x.shape}; expected None or an "
                f"axis in [{-x.ndim}, {x.ndim})"
            )
        config = dataclasses.replace(config, channel_axis=axis % x.ndim)
    rows, _ = _layout.view_2d_shape(x.shape, config.channel_axis)
    if config.group_size is not None and rows % config.group_size:
        raise ValueError(
            f"group_size {config.group_size} does not divide the {rows} rows along the "
            f"contraction axes of shape {x.shape} (channel_axis {config.channel_axis}); "
            "use a divisor of it or group_size=None"
        )
    return x, config


@functools.partial(jax.jit, static_argnames=("config",))
def quantize_checked(x: jax.Array, config: QuantConfig) -> QArray:
    """:func:`quantize` of an input that passed :func:`check_input` (no eager checks)."""
    xg = _calibrate.group_view(x, config.channel_axis, config.group_size)
    scale, zero = _calibrate.grouped_params(xg, config)
    values = _calibrate.to_grid(xg, scale, zero, config)
    return QArray.from_grid(
        values.reshape(-1, values.shape[-1]),
        scale,
        zero,
        bits=config.bits,
        shape=x.shape,
        dtype=x.dtype.name,
        channel_axis=config.channel_axis,
        group_size=config.group_size,
        fmt=config.fmt,
    )


def dequantize(q: QArray) -> jax.Array:
    """The float tensor a :class:`QArray` stands for: ``(q - z) * s`` in the original dtype.

    Args:
      q: a quantized array.

    Returns:
      An array of ``q.shape`` and ``q.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> dequantize(quantize(jnp.array([0.0, 1.0, -1.0]), bits=4, channel_axis=None))
      Array([ 0.,  1., -1.], dtype=float32)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a QArray; got {type(q).__name__}")
    return q.dequantize()
