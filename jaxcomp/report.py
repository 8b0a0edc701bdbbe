"""Size, bits and sparsity of compressed trees, as tables (text, Markdown, JSON) and plots.

Every byte figure is measured: ``.nbytes`` of the arrays held in memory
(packed codes and scales for quantized leaves) or files on disk
(:func:`jaxcomp.checkpoint.disk_bytes`), never a formula.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxcomp.quant import QArray
from jaxcomp.rules import path_str, tree_nbytes

PyTree = Any


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, QArray)


def _dense(leaf) -> np.ndarray:
    return np.asarray(leaf.dequantize() if isinstance(leaf, QArray) else leaf)


def count_params(tree: PyTree) -> int:
    """Number of parameters, counting a quantized leaf by its original shape."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_leaf)
    return sum(int(math.prod(x.shape)) for x in leaves if x is not None)


def count_nonzero(tree: PyTree) -> int:
    """Number of parameters whose (dequantized) value is not exactly zero."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_leaf)
    return sum(int(np.count_nonzero(_dense(x))) for x in leaves if x is not None)


def leaf_table(tree: PyTree) -> list[dict[str, Any]]:
    """One row per leaf: path, shape, format, bits per parameter, sparsity and bytes."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]:
        if leaf is None:
            continue
        size = int(math.prod(leaf.shape))
        nbytes = tree_nbytes(leaf)
        fmt = f"int{leaf.bits}" if isinstance(leaf, QArray) else str(np.dtype(leaf.dtype))
        if isinstance(leaf, QArray) and leaf.group_size:
            fmt += f" g{leaf.group_size}"
        rows.append(
            {
                "path": path_str(path),
                "shape": list(leaf.shape),
                "format": fmt,
                "bits_per_param": 8 * nbytes / max(size, 1),
                "sparsity": 1.0 - np.count_nonzero(_dense(leaf)) / max(size, 1),
                "bytes": nbytes,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, *, markdown=False
) -> str:
    """Formats rows as an aligned plain-text table or a Markdown table.

    >>> print(format_table([{"model": "a", "bytes": 1024}], markdown=True))
    | model | bytes |
    |:------|------:|
    | a     | 1,024 |
    """
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float) for r in rows) for c in columns]

    def line(values):
        parts = [
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        ]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    out = [line(columns)]
    if markdown:
        out.append(
            "|"
            + "|".join(
                (("-" * (w + 1)) + ":") if n else (":" + "-" * (w + 1))
                for w, n in zip(widths, numeric, strict=True)
            )
            + "|"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes ``payload`` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def plot_accuracy_vs_bytes(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    x: str = "bytes_on_disk",
    y: str = "test_accuracy",
) -> None:
    """Saves a PNG scatter of accuracy against bytes (log scale), one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    markers = "osD^vP*Xh<>p"
    for i, row in enumerate(rows):
        err = row.get(f"{y}_std")
        ax.errorbar(
            row[x],
            100 * row[y],
            yerr=None if err is None else 100 * err,
            fmt=markers[i % len(markers)],
            markersize=7,
            capsize=3,
            label=row["model"],
        )
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
