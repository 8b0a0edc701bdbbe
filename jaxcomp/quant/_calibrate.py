"""Scales and zero points: the clipping range of each channel or group and its grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import _formats, _layout
from jaxcomp.quant._config import QuantConfig

MSE_RATIOS = 100  # clipping ratios tried by calibration="mse", evenly spaced in [0.5, 1]


def _params_from_range(lo, hi, config: QuantConfig):
    """Scale and zero point of the grid that covers ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    if config.symmetric:
        scale = hi / _formats.grid_max(config.fmt, config.bits)
    else:
        qmin, qmax = _formats.int_grid(config.bits)
        scale = (hi - lo) / (qmax - qmin)
    scale = jnp.where(scale > 0, scale, jnp.float32(1.0))
    if config.symmetric:
        return scale, None
    return scale, jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)


def _unclipped_codes(xg, scale, zero):
    q = jnp.round(xg / scale[:, None, :])
    if zero is not None:
        q = q + zero[:, None, :]
    return q


def to_grid(xg, scale, zero, config: QuantConfig) -> jax.Array:
    """Nearest grid values (float32) of grouped ``[G, g, N]`` values, given ``[G, N]`` params.

    For the integer grid this is ``clip(round(x / s) + z, qmin, qmax)``.
    """
    if config.fmt == "int":
        return jnp.clip(_unclipped_codes(xg, scale, zero), *_formats.int_grid(config.bits))
    return _formats.snap(xg / scale[:, None, :], config.fmt)


def in_range(xg, scale, zero, config: QuantConfig) -> jax.Array:
    """Mask of the values that :func:`to_grid` does not clip."""
    if config.fmt == "int":
        qmin, qmax = _formats.int_grid(config.bits)
        q = _unclipped_codes(xg, scale, zero)
        return (q >= qmin) & (q <= qmax)
    return jnp.abs(xg / scale[:, None, :]) <= _formats.grid_max(config.fmt, config.bits)


def from_grid(v, scale, zero) -> jax.Array:
    """``(v - z) * s`` for grouped ``[G, g, N]`` grid values."""
    if zero is not None:
        v = v - zero[:, None, :]
    return v * scale[:, None, :]


def _full_range(xg, symmetric: bool):
    if symmetric:
        hi = jnp.max(jnp.abs(xg), axis=1)
        return -hi, hi
    lo = jnp.minimum(jnp.min(xg, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(xg, axis=1), 0.0)
    return lo, hi


def _percentile_range(xg, symmetric: bool, percentile: float):
    if symmetric:
        hi = jnp.percentile(jnp.abs(xg), percentile, axis=1)
        return -hi, hi
    lo = jnp.minimum(jnp.percentile(xg, 100.0 - percentile, axis=1), 0.0)
    hi = jnp.maximum(jnp.percentile(xg, percentile, axis=1), 0.0)
    return lo, hi


def _mse_range(xg, config: QuantConfig):
    """Scans clipping ratios from 1 down to 0.5; keeps the first with the least error."""
    lo, hi = _full_range(xg, config.symmetric)
    ratios = jnp.linspace(1.0, 0.5, MSE_RATIOS, dtype=jnp.float32)

    def step(best, ratio):
        best_err, best_ratio = best
        scale, zero = _params_from_range(lo * ratio, hi * ratio, config)
        x_hat = from_grid(to_grid(xg, scale, zero, config), scale, zero)
        err = jnp.sum(jnp.square(xg - x_hat), axis=1)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

    init = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
    (_, ratio), _ = jax.lax.scan(step, init, ratios)
    return lo * ratio, hi * ratio


def grouped_params(xg: jax.Array, config: QuantConfig):
    """Scale ``[G, N]`` and zero point (``None`` or float ``[G, N]``) of grouped float32 values."""
    if config.calibration == "percentile":
        lo, hi = _percentile_range(xg, config.symmetric, config.percentile)
    elif config.calibration == "mse":
        lo, hi = _mse_range(xg, config)
    else:
        lo, hi = _full_range(xg, config.symmetric)
    return _params_from_range(lo, hi, config)


def group_view(x: ArrayLike, channel_axis: int | None, group_size: int | None) -> jax.Array:
    """float32 values grouped as ``[G, g, N]``: the rows of the matrix view that share a scale."""
    x2d = _layout.to_2d(jnp.asarray(x).astype(jnp.float32), channel_axis)
    rows = x2d.shape[0]
    return _layout.grouped(x2d, rows // group_size if group_size else 1)
