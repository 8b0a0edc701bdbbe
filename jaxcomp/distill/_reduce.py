"""Reductions over positions: masked mean, ``(sum, count)`` pairs and per-position values.

A loss over a batch of positions (tokens, examples) is the mean over the positions
that ``where`` keeps. To stay exact under gradient accumulation and data
parallelism, reduce each piece to ``(sum, count)``, add the pairs (or ``psum``
them across devices) and divide once with :func:`mean_from_sum_count`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Reduction = Literal["mean", "sum_count", "none"]
LossOutput = jax.Array | tuple[jax.Array, jax.Array]

_REDUCTIONS = ("mean", "sum_count", "none")


def mean_from_sum_count(total: ArrayLike, count: ArrayLike) -> jax.Array:
    r"""Divides a summed loss by its count of positions; 0 when the count is 0.

    .. math::

        \bar L = \frac{\sum_i L_i}{\max(n, 1)}

    Args:
      total: summed loss, e.g. the first element of ``kl_div(..., reduction="sum_count")``
        added over micro-batches or ``psum``-ed over devices.
      count: number of positions that went into ``total`` (integer or float).

    Returns:
      A float32 scalar: ``total / count``, or 0 for a fully masked batch (never NaN).

    Example:
      >>> import jax.numpy as jnp
      >>> float(mean_from_sum_count(jnp.float32(3.0), jnp.int32(4)))
      0.75
      >>> float(mean_from_sum_count(jnp.float32(0.0), jnp.int32(0)))
      0.0
    """
    total = jnp.asarray(total).astype(jnp.float32)
    count = jnp.asarray(count).astype(jnp.float32)
    return total / jnp.maximum(count, 1.0)


def _reduce(per_position: jax.Array, where: jax.Array | None, reduction: str) -> LossOutput:
    """Applies ``reduction`` to per-position losses of the leading shape ``[...]``.

    ``"mean"``: float32 scalar over unmasked positions (0 if none); ``"sum_count"``:
    ``(float32 sum, int32 count)``; ``"none"``: per-position values, 0 where masked.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if where is None:
        values = per_position
        count = jnp.asarray(per_position.size, jnp.int32)
    else:
        values = jnp.where(where, per_position, 0.0)
        count = jnp.sum(where, dtype=jnp.int32)
    if reduction == "none":
        return values
    total = jnp.sum(values)
    if reduction == "sum_count":
        return total, count
    return mean_from_sum_count(total, count)
