"""Per-leaf and total sparsity tables for params and mask trees."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jaxcomp.rules import PyTree
from jaxcomp.sparsity._masks import _leaves_with_paths


class SummaryRow(NamedTuple):
    """One row of :func:`summary`: a leaf, or the total (``path="total"``, ``shape=None``)."""

    path: str
    shape: tuple[int, ...] | None
    size: int
    kept: int
    sparsity: float


def _row(path: str, shape: tuple[int, ...] | None, size: int, kept: int) -> SummaryRow:
    return SummaryRow(path, shape, size, kept, 1.0 - kept / size if size else 0.0)


def summary(params_or_masks: PyTree) -> list[SummaryRow]:
    """Counts kept (non-zero, or ``True``) entries per leaf and in total.

    .. math::

        \\mathrm{sparsity} = 1 - \\frac{\\mathrm{kept}}{\\mathrm{size}}

    Counting happens on the host with Python integers, so it is exact for any
    size; call it outside ``jit``. ``None`` leaves of a mask tree (dense params)
    have no known size and are left out; to include them, summarise
    ``apply_masks(params, masks)`` instead.

    Args:
      params_or_masks: a params tree (non-zero entries are kept) or a mask tree
        (``True`` entries are kept).

    Returns:
      One :class:`SummaryRow` per array leaf in tree order, then a total row.

    >>> import jax.numpy as jnp
    >>> rows = summary({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]])})
    >>> rows[0]
    SummaryRow(path='w', shape=(2, 2), size=4, kept=2, sparsity=0.5)
    >>> rows[-1].path, rows[-1].kept
    ('total', 2)
    """
    rows = []
    for path, leaf in _leaves_with_paths(params_or_masks):
        if leaf is None:
            continue
        value = np.asarray(jax.device_get(leaf))
        rows.append(_row(path, tuple(value.shape), int(value.size), int(np.count_nonzero(value))))
    total_size = sum(r.size for r in rows)
    total_kept = sum(r.kept for r in rows)
    return [*rows, _row("total", None, total_size, total_kept)]


def format_summary(rows: list[SummaryRow]) -> str:
    """Renders :func:`summary` rows as a plain-text table.

    Args:
      rows: rows from :func:`summary`.

    Returns:
      A string with a header line, one line per row and a rule above the total.

    >>> import jax.numpy as jnp
    >>> print(format_summary(summary({"w": jnp.array([0.0, 1.0, 2.0, 3.0])})))
    path   shape  size  kept  sparsity
    w          4     4     3    25.00%
    ----------------------------------
    total            4     3    25.00%
    """
    header = ("path", "shape", "size", "kept", "sparsity")
    body = [
        (
            r.path,
            "" if r.shape is None else "x".join(str(d) for d in r.shape) or "scalar",
            str(r.size),
            str(r.kept),
            f"{100.0 * r.sparsity:.2f}%",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    lines = [fmt(header)]
    for r, line in zip(rows, body, strict=True):
        if r.shape is None:
            lines.append("-" * len(lines[0]))
        lines.append(fmt(line))
    return "\n".join(lines)
