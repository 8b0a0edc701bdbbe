"""Exact, deterministic top-k selection that works under ``jit``.

Scores are mapped to ``uint32`` keys whose unsigned order is the float order,
so that ties are exact key equalities. :func:`_keep_top` finds the k-th largest
key :math:`T` of each row, keeps every entry above it, and keeps the tied
entries in index order until exactly ``keep`` are kept. Because it only counts,
the number to keep may be a traced value and a row may span several arrays
(one global threshold over many leaves, without concatenating them).

:math:`T` is the largest key with :math:`c(T) \\ge k`, where :math:`c(t)` is
the number of keys :math:`\\ge t`. :func:`_search_threshold` finds it without
sorting, one counting pass over the keys per step, keeping a bracket
:math:`lo \\le T \\le hi` with :math:`c(lo) \\ge k > c(hi + 1)`:

1. the first two steps test keys read off a strided sample (every 61st entry),
   at sample ranks :math:`k s / n \\mp 4\\sigma`, so that the bracket holds
   :math:`T` unless the sample misleads; a miss only narrows the bracket less;
2. later steps aim at rank :math:`k - 1/2` by linear interpolation of the count
   in the score between the ends (regula falsi, an end kept twice counting half:
   Illinois). After three steps in a row that failed to halve the entries in the
   bracket (a block of ties) one pass moves :math:`hi` down to the largest key in
   the bracket and the next tests it; after five, steps halve the key interval.
   So the search always ends (within a few hundred passes on adversarial data);
   it takes 5-10 on continuous scores, about 30 with big blocks of ties at T;
3. once :math:`c(lo) = k` (or :math:`c(hi + 1) = k - 1`), :math:`T` is the
   smallest key :math:`\\ge lo` (the largest :math:`\\le hi`): one more pass.

Rows of at most 8192 entries skip all this: a 32-step bitwise search over them
(one counting pass per bit) is cheap.

References: Floyd and Rivest, Expected time bounds for selection, 1975.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_TOP_BIT = 0x80000000
_MAX_KEY = 0xFFFFFFFF
# Sample every 61st entry (prime, so that it walks across the columns of a matrix), or
# every entry of rows short enough that a 32-step search over them is cheap.
_STRIDE = 61
_FULL_SAMPLE = 8192
_SAMPLE_SIGMAS = 4.0  # half-width of the sample bracket, in standard deviations of the rank
# After this many steps in a row that failed to halve the entries in the bracket, snap
# its top to the largest key in it (ties), and after that many, halve the key interval.
_SNAP_AFTER = 3
_BISECT_AFTER = 5


def _sortable_keys(scores: jax.Array) -> jax.Array:
    """``uint32`` keys ordered like the float32 scores; NaN sorts lowest, -0 == +0."""
    x = scores.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    x = jnp.where(x == 0, jnp.zeros((), jnp.float32), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = bits >= jnp.uint32(_TOP_BIT)
    return jnp.where(negative, ~bits, bits | jnp.uint32(_TOP_BIT))


class _Search(NamedTuple):
    """Result of :func:`_search_threshold`, per row."""

    threshold: jax.Array  # uint32 k-th largest key T
    above: jax.Array  # int32 number of keys > T
    at_least: jax.Array  # int32 number of keys >= T
    steps: jax.Array  # int32 counting passes of the search loop (the same for every row)
    missed: jax.Array  # bool: a sample bracket end fell on the wrong side of T


def _key_values(keys: jax.Array) -> jax.Array:
    """float32 scores of ``uint32`` keys, the inverse of :func:`_sortable_keys`."""
    top = jnp.uint32(_TOP_BIT)
    bits = jnp.where(keys >= top, keys ^ top, ~keys)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _count(keys: Sequence[jax.Array], threshold: jax.Array) -> jax.Array:
    """int32 ``[G]``: keys ``>= threshold[g]`` in row ``g`` over all arrays."""
    t = threshold[:, None]
    return sum(jnp.sum(k >= t, axis=1, dtype=jnp.int32) for k in keys)


def _stride(n: int) -> int:
    """Sampling stride for rows of ``n`` entries."""
    return 1 if n <= _FULL_SAMPLE else _STRIDE


def _sample_keys(keys: Sequence[jax.Array], ranks: jax.Array) -> jax.Array:
    """uint32 ``[G, R]``: the ``ranks[g, r]``-th largest key of a strided sample of row ``g``.

    A 32-step bitwise search on the sample (1/61 of the entries): rank 0 or less
    gives ``0xFFFFFFFF``, a rank above the sample size gives 0.
    """
    stride = _stride(sum(k.shape[1] for k in keys))
    sample = jnp.concatenate([k[:, ::stride] for k in keys], axis=1)[:, None, :]

    def step(_, carry):
        threshold, bit = carry
        candidate = threshold | bit
        count = jnp.sum(sample >= candidate[:, :, None], axis=2, dtype=jnp.int32)
        return jnp.where(count >= ranks, candidate, threshold), bit >> jnp.uint32(1)

    start = (jnp.zeros(ranks.shape, jnp.uint32), jnp.uint32(_TOP_BIT))
    return lax.fori_loop(0, 32, step, start)[0]


def _sample_guesses(keys: Sequence[jax.Array], keep: jax.Array):
    """First two candidates ``(high, low)`` and whether each exists, from a strided sample.

    ``high`` should have fewer than ``keep`` keys at or above it, ``low`` at least
    ``keep``: the sample ranks are :math:`q s \\mp z \\sqrt{s q (1 - q)}` with
    :math:`q = k / n` for a sample of size :math:`s`.
    """
    n = sum(k.shape[1] for k in keys)
    stride = _stride(n)
    s = sum(-(-k.shape[1] // stride) for k in keys)
    q = keep.astype(jnp.float32) / jnp.float32(max(n, 1))
    mean = keep.astype(jnp.float32) * jnp.float32(s / max(n, 1))  # exact when s == n
    # Strided sampling without replacement: finite-population factor 1 - s / n.
    spread = _SAMPLE_SIGMAS * jnp.sqrt(s * q * (1 - q) * (1 - s / max(n, 1))) + float(s < n)
    rank_high = jnp.floor(mean - spread).astype(jnp.int32)
    rank_low = jnp.ceil(mean + spread).astype(jnp.int32)
    found = _sample_keys(keys, jnp.stack([rank_high, rank_low], axis=1))
    high_ok = (rank_high >= 1) & (found[:, 0] < jnp.uint32(_MAX_KEY))
    # Test high + 1: c(high + 1) < keep makes high a valid upper end.
    return found[:, 0] + jnp.uint32(1), high_ok, found[:, 1], rank_low <= s


def _search_threshold(keys: Sequence[jax.Array], keep: jax.Array) -> _Search:
    """The ``keep[g]``-th largest key of each row by a bracketed counting search.

    Args:
      keys: ``uint32`` arrays ``[G, n_i]``, a row spanning all of them.
      keep: int32 ``[G]``, ``0 <= keep[g] <= sum n_i``.

    Returns:
      a :class:`_Search`; for ``keep[g] == 0`` the threshold is ``0xFFFFFFFF``,
      which no key reaches (NaN keys are mapped to -inf).
    """
    rows = keep.shape[0]
    n = sum(k.shape[1] for k in keys)
    top = jnp.uint32(_MAX_KEY)
    if _stride(n) == 1:  # short rows: the sample is the row, its bitwise search exact
        threshold = _sample_keys(keys, keep[:, None])[:, 0]
        above = _count(keys, threshold + jnp.uint32(1))
        above = jnp.where(threshold == top, 0, above)
        no = jnp.zeros((rows,), bool)
        return _Search(threshold, above, _count(keys, threshold), jnp.int32(0), no)
    empty = keep == 0
    # Invariants for active rows: c(lo) = c_lo >= keep > c_hi = c(hi + 1), lo <= T <= hi.
    lo = jnp.where(empty, top, jnp.zeros((rows,), jnp.uint32))
    hi = jnp.full((rows,), _MAX_KEY, jnp.uint32)
    c_lo = jnp.where(empty, 0, jnp.full((rows,), n, jnp.int32))
    c_hi = jnp.zeros((rows,), jnp.int32)
    high, high_ok, low, low_ok = _sample_guesses(keys, keep)

    def active(state):
        lo, hi, c_lo, c_hi = state[:4]
        return (lo < hi) & (c_lo != keep) & (c_hi != keep - 1)

    def cond(state):
        return jnp.any(active(state))

    def count_step(state):
        lo, hi, c_lo, c_hi, stalls, step, missed, pending, w_lo, w_hi, last = state
        live = active(state)
        width = hi - lo  # >= 1 where live
        # Aim at rank keep - 1/2; an end kept twice in a row counts half (Illinois), so that
        # a convex or concave count does not pin one end of the bracket.
        f_lo = w_lo * ((c_lo - keep).astype(jnp.float32) + 0.5)
        f_hi = w_hi * ((keep - c_hi).astype(jnp.float32) - 0.5)
        frac = f_lo / jnp.maximum(f_lo + f_hi, 1e-30)
        guess = jnp.round(frac * (width.astype(jnp.float32) + 1))
        guess = jnp.clip(guess, 1.0, 4294967040.0).astype(jnp.uint32)
        # Interpolate the score itself where both ends are finite (densities are smooth in
        # the score, not in its bit pattern, which is logarithmic), else the key.
        v_lo, v_hi = _key_values(lo), _key_values(hi + jnp.uint32(1))
        value = v_lo + frac * (v_hi - v_lo)
        by_value = jnp.clip(_sortable_keys(value), lo + jnp.uint32(1), hi) - lo
        finite = jnp.isfinite(v_lo) & jnp.isfinite(v_hi) & (hi < top)
        guess = jnp.where(finite, by_value, guess)
        offset = jnp.where(stalls >= _BISECT_AFTER, (width >> 1) + 1, guess)
        offset = jnp.where(pending, width, offset)  # test the key hi was just snapped to
        sampled = ((step == 0) & high_ok) | ((step == 1) & low_ok)
        offset = jnp.where(sampled, jnp.where(step == 0, high, low) - lo, offset)
        # Any candidate in [lo + 1, hi] shrinks the bracket (unsigned wrap-around included).
        offset = jnp.where((offset >= 1) & (offset <= width), offset, jnp.minimum(guess, width))
        candidate = lo + offset
        count = _count(keys, candidate)
        up = live & (count >= keep)
        down = live & (count < keep)
        new_inside = jnp.where(up, count - c_hi, jnp.where(down, c_lo - count, c_lo - c_hi))
        halved = 2 * new_inside <= c_lo - c_hi
        missed = missed | (sampled & (step == 0) & up) | (sampled & (step == 1) & down)
        one = jnp.ones_like(w_lo)
        return (
            jnp.where(up, candidate, lo),
            jnp.where(down, candidate - jnp.uint32(1), hi),
            jnp.where(up, count, c_lo),
            jnp.where(down, count, c_hi),
            jnp.where(halved | ~live, 0, stalls + 1),
            step + 1,
            missed,
            jnp.zeros_like(pending),
            jnp.where(up, one, jnp.where(down & (last < 0), 0.5 * w_lo, w_lo)),
            jnp.where(down, one, jnp.where(up & (last > 0), 0.5 * w_hi, w_hi)),
            jnp.where(up, 1, jnp.where(down, -1, last)),
        )

    def snap_step(state):
        # hi -> the largest key <= hi keeps c(hi + 1); the next step tests that key, which
        # ends the search when it is T (a block of ties straddling rank keep).
        lo, hi, c_lo, c_hi, stalls, step, missed, pending = state[:8]
        live = active(state)
        largest = jnp.zeros((rows,), jnp.uint32)
        for k in keys:
            below = jnp.where(k <= hi[:, None], k, jnp.uint32(0))
            largest = jnp.maximum(largest, jnp.max(below, axis=1, initial=jnp.uint32(0)))
        hi = jnp.where(live, jnp.maximum(largest, lo), hi)
        return (
            lo,
            hi,
            c_lo,
            c_hi,
            stalls + live.astype(jnp.int32),
            step + 1,
            missed,
            live,
            *state[8:],
        )

    def body(state):
        stalls, pending = state[4], state[7]
        snap = jnp.all(~active(state) | ((stalls == _SNAP_AFTER) & ~pending))
        return lax.cond(snap, snap_step, count_step, state)

    zeros = jnp.zeros((rows,), jnp.int32)
    no = jnp.zeros((rows,), bool)
    ones = jnp.ones((rows,), jnp.float32)
    start = (lo, hi, c_lo, c_hi, zeros, jnp.int32(0), no, no, ones, ones, zeros)
    lo, hi, c_lo, c_hi, _, steps, missed = lax.while_loop(cond, body, start)[:7]

    # c(lo) = keep: T is the smallest key >= lo; c(hi + 1) = keep - 1: the largest <= hi.
    need_min = (lo < hi) & (c_lo == keep)
    need_max = (lo < hi) & ~need_min

    def finish(_):
        flip = need_max[:, None]
        lowest = jnp.full((rows,), _MAX_KEY, jnp.uint32)
        for k in keys:
            valid = jnp.where(flip, k <= hi[:, None], k >= lo[:, None])
            value = jnp.where(valid, jnp.where(flip, ~k, k), top)
            lowest = jnp.minimum(lowest, jnp.min(value, axis=1, initial=top))
        threshold = jnp.where(need_min, lowest, jnp.where(need_max, ~lowest, lo))
        # One count gives the missing figure: c(T + 1) after a min, c(T) after a max.
        probe = jnp.where(need_min & (threshold < top), threshold + jnp.uint32(1), threshold)
        counted = jnp.where(need_min & (threshold == top), 0, _count(keys, probe))
        above = jnp.where(need_min, counted, c_hi)
        at_least = jnp.where(need_max, counted, c_lo)
        return threshold, above, at_least

    def done(_):
        return lo, c_hi, c_lo

    threshold, above, at_least = lax.cond(jnp.any(need_min | need_max), finish, done, None)
    return _Search(threshold, above, at_least, steps, missed)


TIE_BLOCK = 4096  # columns per block when ranking ties blockwise


def _first_ties(tie: jax.Array, wanted: jax.Array) -> jax.Array:
    """The first ``wanted[g]`` True entries of each row of ``tie`` ``[G, n]`` (all if more).

    A cumsum over whole rows is the costliest pass on CPU, so long rows are cut into
    blocks of ``TIE_BLOCK``: whole blocks are kept or dropped from their tie counts,
    and only the one block per row where the count runs out is ranked by a cumsum.
    """
    g, n = tie.shape
    if n < 4 * TIE_BLOCK:
        return tie & (jnp.cumsum(tie, axis=1, dtype=jnp.int32) <= wanted[:, None])
    blocks = -(-n // TIE_BLOCK)
    padded = jnp.pad(tie, ((0, 0), (0, blocks * TIE_BLOCK - n))).reshape(g, blocks, TIE_BLOCK)
    counts = jnp.sum(padded, axis=2, dtype=jnp.int32)  # [G, blocks]
    before = jnp.cumsum(counts, axis=1) - counts  # ties in the earlier blocks
    left = wanted[:, None] - before  # ties still wanted when each block starts
    whole = left >= counts  # every tie of the block is kept
    partial = (left > 0) & ~whole  # at most one block per row
    at = jnp.argmax(partial, axis=1)  # [G]; any block if none is partial (then unused)
    block = jnp.take_along_axis(padded, at[:, None, None], axis=1)[:, 0]  # [G, TIE_BLOCK]
    budget = jnp.take_along_axis(left, at[:, None], axis=1)  # [G, 1]
    in_block = block & (jnp.cumsum(block, axis=1, dtype=jnp.int32) <= budget)
    chosen = (jnp.arange(blocks)[None, :] == at[:, None]) & jnp.any(partial, axis=1)[:, None]
    kept = padded & (whole[:, :, None] | (chosen[:, :, None] & in_block[:, None, :]))
    return kept.reshape(g, blocks * TIE_BLOCK)[:, :n]


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
    rows = keep.shape[0]
    threshold, above_count, at_least, _, _ = _search_threshold(keys, keep)
    ties_needed = keep - above_count
    ties_total = at_least - above_count

    def rank_ties(_):
        masks = []
        ties_before = jnp.zeros((rows,), jnp.int32)
        for k in keys:
            above = k > threshold[:, None]
            tie = k == threshold[:, None]
            kept_ties = _first_ties(tie, ties_needed - ties_before)
            masks.append(above | kept_ties)
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
