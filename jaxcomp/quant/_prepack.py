"""Weight prepacking: int8 codes stored in the order the native W8A8 kernel reads.

The AMX kernel (``kernels/int8_matmul.cc``) multiplies by weights in tile order
(:func:`jaxcomp.quant._layout.to_amx`). Given ``[K, N]`` codes it repacks every
column panel on every call, which costs about as much as reading the weight
twice; a weight stored in tile order once is read straight from memory. This is
the usual deployment step of CPU inference stacks (oneDNN's weight "reorder",
llama.cpp's repacked quant types).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxcomp.quant import _layout
from jaxcomp.quant._qarray import LAYOUTS, QArray


def _relayout(q: QArray, layout: str) -> QArray:
    if q.layout == layout or not q.amx_eligible or q.zero_point is not None:
        return q
    codes = q.matrix_codes() if layout == "rows" else _layout.to_amx(q.codes)
    return dataclasses.replace(q, codes=codes, layout=layout)


def prepack(tree: Any, layout: str = "amx") -> Any:
    """Stores the W8A8-kind QArrays of ``tree`` (symmetric int8 per channel) in ``layout``.

    Args:
      tree: any pytree holding QArrays (Linen params, an ``nnx.State``, one QArray).
      layout: ``"amx"`` (AMX tile order, read without repacking by
        :func:`jaxcomp.quant.w8a8_dot_general` on CPUs with AMX) or ``"rows"``
        (back to the matrix view). Other QArrays and leaves pass through.

    Returns:
      The tree with those QArrays relaid out; values, ``dequantize()`` and
      ``nbytes`` are unchanged up to zero padding of ``K`` to a multiple of 64 and
      ``N`` to a multiple of 32. Every path (XLA on any backend, the weight-only
      dot, checkpoints) still accepts them.

    Raises:
      ValueError: an unknown ``layout``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcomp.quant import quantize
      >>> q = prepack(quantize(jnp.ones((128, 64)), bits=8))
      >>> q.layout, q.codes.shape, bool((q.dequantize() == 1).all())
      ('amx', (2, 4096), True)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"prepack layout is {layout!r}; expected one of {LAYOUTS}")
    return jax.tree.map(
        lambda leaf: _relayout(leaf, layout) if isinstance(leaf, QArray) else leaf,
        tree,
        is_leaf=lambda leaf: isinstance(leaf, QArray),
    )
