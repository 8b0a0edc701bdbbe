"""Sparsity patterns: which entries of a kernel are pruned together.

Every pattern works on the matrix view ``[K, C]`` of a Flax kernel: ``C`` is the
last (output) axis and ``K`` the product of the others, the contraction axes
(``in`` for Dense ``[in, out]``, ``h*w*in`` for Conv ``[h, w, in, out]``, in
row-major order so consecutive entries run along ``in``).

- ``"unstructured"``: every entry is its own unit.
- ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive entries along
  ``K`` (within one output column) exactly ``N`` are kept; ``K % M == 0``.
- ``"block:RxC"`` (e.g. ``"block:1x4"``): units are blocks of ``R`` consecutive
  rows by ``C`` consecutive columns, scored by the mean score of their entries.
- ``"channel"``: units are whole output columns, scored by their mean score.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
_ALLOWED = '"unstructured", "N:M" (e.g. "2:4"), "block:RxC" (e.g. "block:1x4") or "channel"'


class Pattern(NamedTuple):
    """Parsed pattern string; ``kind`` is "unstructured", "n:m", "block" or "channel"."""

    kind: str
    n: int = 0
    m: int = 0
    rows: int = 1
    cols: int = 1

    @property
    def implied_sparsity(self) -> float | None:
        """``1 - N/M`` for N:M patterns, ``None`` where the sparsity is free."""
        return 1.0 - self.n / self.m if self.kind == "n:m" else None


def _parse_pattern(pattern: str) -> Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"pattern is {pattern!r}; expected a string: {_ALLOWED}")
    if pattern in ("unstructured", "channel"):
        return Pattern(pattern)
    if match := _NM.match(pattern):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {pattern!r} needs 0 < N < M, got N={n}, M={m}")
        return Pattern("n:m", n=n, m=m)
    if match := _BLOCK.match(pattern):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1:
            raise ValueError(f"pattern {pattern!r} needs block sides >= 1, got {rows}x{cols}")
        return Pattern("block", rows=rows, cols=cols)
    raise ValueError(f"unknown pattern {pattern!r}; allowed: {_ALLOWED}")


def _matrix_shape(path: str, shape: tuple[int, ...], why: str) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(
            f"leaf {path!r} has shape {shape}; {why} needs a kernel of rank >= 2 "
            "(contraction axes first, output axis last)"
        )
    return math.prod(shape[:-1]), shape[-1]


def _check_leaf(path: str, shape: tuple[int, ...], pattern: Pattern, scope: str) -> None:
    """Raises ``ValueError`` naming ``path`` when ``shape`` cannot take the pattern."""
    if pattern.kind == "n:m":
        k, _ = _matrix_shape(path, shape, f"pattern '{pattern.n}:{pattern.m}'")
        if k % pattern.m:
            raise ValueError(
                f"leaf {path!r} has shape {shape}: its contraction size {k} is not divisible "
                f"by M={pattern.m} of pattern '{pattern.n}:{pattern.m}'"
            )
    elif pattern.kind == "block":
        k, c = _matrix_shape(path, shape, f"pattern 'block:{pattern.rows}x{pattern.cols}'")
        if k % pattern.rows or c % pattern.cols:
            raise ValueError(
                f"leaf {path!r} has shape {shape} (matrix view {k}x{c}), which blocks of "
                f"{pattern.rows}x{pattern.cols} do not tile"
            )
    elif pattern.kind == "channel":
        _matrix_shape(path, shape, "pattern 'channel'")
    if scope == "output":
        _matrix_shape(path, shape, "scope 'output'")


def _unit_grid(shape: tuple[int, ...], pattern: Pattern, scope: str) -> tuple[int, int]:
    """``(rows, units per row)`` of :func:`_units` for a leaf of ``shape``."""
    if pattern.kind == "unstructured":
        if scope == "output":
            return shape[-1], math.prod(shape[:-1])
        return 1, math.prod(shape)
    k, c = math.prod(shape[:-1]), shape[-1]
    if pattern.kind == "channel":
        return 1, c
    return 1, (k // pattern.rows) * (c // pattern.cols)


def _units(scores: jax.Array, pattern: Pattern, scope: str) -> jax.Array:
    """Scores of the selection units as ``[G, units]`` rows that compete internally."""
    if pattern.kind == "unstructured":
        if scope == "output":
            return scores.reshape(-1, scores.shape[-1]).T
        return scores.reshape(1, -1)
    matrix = scores.reshape(-1, scores.shape[-1]).astype(jnp.float32)
    if pattern.kind == "channel":
        return jnp.mean(matrix, axis=0)[None, :]
    k, c = matrix.shape
    blocks = matrix.reshape(k // pattern.rows, pattern.rows, c // pattern.cols, pattern.cols)
    return jnp.mean(blocks, axis=(1, 3)).reshape(1, -1)


def _expand(unit_mask: jax.Array, shape: tuple[int, ...], pattern: Pattern, scope: str):
    """Inverse of :func:`_units`: a ``[G, units]`` bool mask back to the leaf shape."""
    if pattern.kind == "unstructured":
        return (unit_mask.T if scope == "output" else unit_mask).reshape(shape)
    k, c = math.prod(shape[:-1]), shape[-1]
    if pattern.kind == "channel":
        return jnp.broadcast_to(unit_mask, (k, c)).reshape(shape)
    blocks = unit_mask.reshape(k // pattern.rows, 1, c // pattern.cols, 1)
    full = (k // pattern.rows, pattern.rows, c // pattern.cols, pattern.cols)
    return jnp.broadcast_to(blocks, full).reshape(shape)
