"""Exact, deterministic top-k selection that works under ``jit``.

Scores are mapped to ``uint32`` keys whose unsigned order is the float order,
so that ties are exact key equalities. :func:`_keep_top` finds the k-th largest
key of each row with a 32-step bitwise threshold search (one counting pass per
bit, no sort), keeps every entry above it, and keeps the tied entries in index
order until exactly ``keep`` are kept. Because it only counts, the number to
keep may be a traced value and a row may span several arrays (one global
threshold over many leaves, without concatenating them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_TOP_BIT = 0x80000000


def _sortable_keys(scores: jax.Array) -> jax.Array:
    """``uint32`` keys ordered like the float32 scores; NaN sorts lowest, -0 == +0."""
    x = scores.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    x = jnp.where(x == 0, jnp.zeros((), jnp.float32), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = bits >= jnp.uint32(_TOP_BIT)
    return jnp.where(negative, ~bits, bits | jnp.uint32(_TOP_BIT))


def _keep_top(keys: Sequence[jax.Array], keep: jax.Array) -> list[jax.Array]:
    """Keeps the ``keep[g]`` largest keys of each row ``g`` across ``keys``.

    Args:
      keys: ``uint32`` arrays of shape ``[G, n_i]``; row ``g`` of all of them
        forms one selection group, ordered array by array, then by column.
      keep: int32 ``[G]`` numbers of entries to keep, ``0 <= keep[g] <= sum n_i``.

    Returns:
      bool arrays shaped like ``keys``; among equal keys the earlier entry (lower
      array position, then lower column) is kept first.
    """

    def count(threshold, strict=False):
        t = threshold[:, None]
        return sum(jnp.sum((k > t) if strict else (k >= t), axis=1, dtype=jnp.int32) for k in keys)

    def step(_, carry):
        threshold, bit = carry
        candidate = threshold | bit
        threshold = jnp.where(count(candidate) >= keep, candidate, threshold)
        return threshold, bit >> jnp.uint32(1)

    rows = keep.shape[0]
    start = (jnp.zeros((rows,), jnp.uint32), jnp.uint32(_TOP_BIT))
    threshold, _ = lax.fori_loop(0, 32, step, start)
    above_count = count(threshold, strict=True)
    ties_needed = keep - above_count
    ties_total = count(threshold) - above_count

    def rank_ties(_):
        masks = []
        ties_before = jnp.zeros((rows,), jnp.int32)
        for k in keys:
            above = k > threshold[:, None]
            tie = k == threshold[:, None]
            tie_rank = jnp.cumsum(tie, axis=1, dtype=jnp.int32) + ties_before[:, None]
            masks.append(above | (tie & (tie_rank <= ties_needed[:, None])))
            ties_before = ties_before + jnp.sum(tie, axis=1, dtype=jnp.int32)
        return masks

    def keep_all_ties(_):
        return [k >= threshold[:, None] for k in keys]

    # The tie ranks need a cumsum over each row, the costliest part on CPU; skip it when
    # every tied entry is kept (the common case with continuous scores).
    return lax.cond(jnp.all(ties_needed == ties_total), keep_all_ties, rank_ties, None)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keep_top_in_groups(scores: jax.Array, n: int, m: int) -> jax.Array:
    """N:M selection: keeps the ``n`` highest of every ``m`` consecutive rows of ``scores``.

    The rank of an entry in its group is the number of entries that beat it
    (higher key, or equal key and lower row), computed by comparing all pairs
    within the group: no sort, exact ties.

    Args:
      scores: ``[K, C]`` with ``K % m == 0``.
      n: entries kept per group.
      m: group length along axis 0.

    Returns:
      bool ``[K, C]``; within a group ties keep the lower row first.
    """
    rows, cols = scores.shape
    groups = _sortable_keys(scores).reshape(rows // m, m, cols)
    mine, other = groups[:, :, None, :], groups[:, None, :, :]
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[None, :, :, None]
    beaten_by = (other > mine) | ((other == mine) & earlier)
    rank = jnp.sum(beaten_by, axis=2, dtype=jnp.int32)
    return (rank < n).reshape(rows, cols)
