"""Folding per-channel scales between a layer and the op that feeds it (AWQ, SmoothQuant).

For a layer ``y = x W`` whose input ``x`` is the output of a LayerNorm
(``x = \\gamma \\odot \\hat x + \\beta``) or of a Dense layer (``x = u V + c``),

.. math::

    x W = (x \\oslash s)(\\mathrm{diag}(s) W), \\qquad
    x \\oslash s = \\gamma / s \\odot \\hat x + \\beta / s = u (V / s) + c / s

so dividing the previous op's output channels by ``s`` and multiplying the
kernel rows by ``s`` leaves the float model's function unchanged while moving
range between activations and weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp.rules import path_str


@dataclasses.dataclass(frozen=True)
class Fold:
    """An op whose output is the input of some Dense kernels, and those kernels.

    Attributes:
      prev: params path of the feeding op: a norm (leaves ``scale`` and, if any,
        ``bias``) or a Dense layer (``kernel`` ``[.., K]`` and, if any, ``bias``).
        The fold is exact only when the op's output reaches nothing but ``layers``
        (a residual connection would see the rescaled values too).
      layers: paths of the kernels ``[K, N]`` that read that output.

    Example:
      >>> Fold("block_0/LayerNorm_1", ("block_0/mlp/fc/kernel",)).layers
      ('block_0/mlp/fc/kernel',)
    """

    prev: str
    layers: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.prev, str) or not self.prev:
            raise TypeError(f"Fold.prev is {self.prev!r}; expected a params path string")
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if not layers or not all(isinstance(p, str) for p in layers):
            raise TypeError(f"Fold.layers is {self.layers!r}; expected kernel path strings")
        object.__setattr__(self, "layers", layers)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` of a params pytree (Linen dict or ``nnx.State``)."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def replace_leaves(tree: Any, new: dict[str, Any]) -> Any:
    """``tree`` with the leaves at the paths of ``new`` replaced."""
    return jax.tree_util.tree_map_with_path(lambda p, x: new.get(path_str(p), x), tree)


def check_fold(fold: Fold, leaves: dict[str, Any]) -> int:
    """Validates a fold against the params; returns the shared channel count ``K``."""
    if f"{fold.prev}/scale" not in leaves and f"{fold.prev}/kernel" not in leaves:
        raise ValueError(
            f"Fold.prev {fold.prev!r} names no norm (.../scale) or Dense (.../kernel) in the params"
        )
    prev_out = jnp.shape(leaves.get(f"{fold.prev}/scale", leaves.get(f"{fold.prev}/kernel")))[-1]
    for path in fold.layers:
        if path not in leaves:
            raise ValueError(f"Fold layer {path!r} is not a leaf of the params")
        shape = jnp.shape(leaves[path])
        if len(shape) != 2 or shape[0] != prev_out:
            raise ValueError(
                f"Fold layer {path!r} has shape {shape}; expected a kernel [{prev_out}, N] "
                f"reading the {prev_out} outputs of {fold.prev!r}"
            )
    return prev_out


def fold_scales(params: Any, fold: Fold, scales: jax.Array) -> Any:
    """Divides ``fold.prev``'s output channels by ``scales`` and multiplies ``fold.layers``' rows.

    Args:
      params: Linen params dict or ``nnx.State`` (float leaves at the fold's paths).
      fold: the :class:`Fold`.
      scales: positive ``[K]``.

    Returns:
      The params with those leaves replaced (same structure; same function up to
      float rounding).

    Raises:
      ValueError: paths missing from the params, or shapes that don't chain.

    Example:
      >>> import flax.linen as nn
      >>> params = {"ln": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
      ...           "fc": {"kernel": jnp.ones((2, 3))}}
      >>> out = fold_scales(params, Fold("ln", ("fc/kernel",)), jnp.array([2.0, 4.0]))
      >>> out["ln"]["scale"], out["fc"]["kernel"][:, 0]
      (Array([0.5 , 0.25], dtype=float32), Array([2., 4.], dtype=float32))
    """
    leaves = leaves_by_path(params)
    k = check_fold(fold, leaves)
    s = jnp.asarray(scales, jnp.float32)
    if s.shape != (k,):
        raise ValueError(f"scales for {fold.prev!r} have shape {s.shape}; expected ({k},)")
    new = {}
    for leaf in ("scale", "bias", "kernel"):
        path = f"{fold.prev}/{leaf}"
        if path in leaves:
            x = leaves[path]
            new[path] = (x / s).astype(x.dtype)
    for path in fold.layers:
        x = leaves[path]
        new[path] = (x * s[:, None]).astype(x.dtype)
    return replace_leaves(params, new)
