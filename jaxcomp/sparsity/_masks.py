"""Mask trees: applying, combining and counting pruning masks.

A *mask tree* has the structure of the params tree it belongs to. A leaf is a
``bool`` array of the param's shape (``True`` = kept) where the param is pruned,
or ``None`` where the param stays dense. Flax Linen params dicts and
``flax.nnx.State`` are both supported: a mask tree of an ``nnx.State`` is an
``nnx.State`` whose variables hold the masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp.rules import PyTree, path_str

Params = PyTree
Masks = PyTree


def _is_none(x: Any) -> bool:
    return x is None


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [(path_str(p), leaf) for p, leaf in flat]


def _check_tree(reference: PyTree, other: PyTree, what: str = "masks", ref: str = "params"):
    """Raises ``ValueError`` unless tree ``other`` matches tree ``reference`` leaf for leaf.

    ``other`` must have the leaf paths, container types and, where its leaf is
    not ``None``, the shapes of ``reference``. The message names the first leaf
    path that differs; ``what`` and ``ref`` name the two trees in it.
    """
    ref_leaves = _leaves_with_paths(reference)
    oth_leaves = _leaves_with_paths(other)
    for i in range(max(len(ref_leaves), len(oth_leaves))):
        ref_path = ref_leaves[i][0] if i < len(ref_leaves) else None
        oth_path = oth_leaves[i][0] if i < len(oth_leaves) else None
        if ref_path != oth_path:
            where = ref_path if ref_path is not None else oth_path
            raise ValueError(
                f"{what} do not match {ref} at leaf {where!r}: {ref} has {ref_path!r} where "
                f"{what} has {oth_path!r}; {what} must have the structure of {ref}, with "
                "None for leaves that stay dense"
            )
        ref_leaf, oth_leaf = ref_leaves[i][1], oth_leaves[i][1]
        if ref_leaf is None or oth_leaf is None:
            continue
        if jnp.shape(oth_leaf) != jnp.shape(ref_leaf):
            raise ValueError(
                f"{what} leaf {ref_path!r} has shape {jnp.shape(oth_leaf)} but in {ref} it has "
                f"shape {jnp.shape(ref_leaf)}; shapes must be equal"
            )
    ref_def = jax.tree.structure(reference, is_leaf=_is_none)
    oth_def = jax.tree.structure(other, is_leaf=_is_none)
    if ref_def != oth_def:
        raise ValueError(
            f"{what} use different containers than {ref} (e.g. a dict for an nnx.State); "
            f"build {what} by mapping over {ref}: {ref} {ref_def}, {what} {oth_def}"
        )


def _check_bool(masks: Masks) -> None:
    for path, leaf in _leaves_with_paths(masks):
        if leaf is not None and jnp.result_type(leaf) != jnp.bool_:
            raise TypeError(
                f"mask leaf {path!r} has dtype {jnp.result_type(leaf)}; masks must be bool "
                "arrays (True = kept) or None"
            )


def apply_masks(params: Params, masks: Masks) -> Params:
    """Zeroes the pruned entries of ``params``; ``None`` mask leaves stay untouched.

    .. math::

        w'_{i} = m_{i} \\, w_{i}

    Args:
      params: params pytree (Linen dict or ``nnx.State``).
      masks: mask tree of the same structure: bool arrays (``True`` = kept) or
        ``None`` for dense leaves.

    Returns:
      A tree like ``params`` with every dtype preserved.

    Raises:
      ValueError: the structure or a shape differs (the message names the leaf).
      TypeError: a mask leaf is not bool.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.ones(2)}
    >>> apply_masks(p, {"w": jnp.array([True, False, True]), "b": None})["w"]
    Array([1., 0., 3.], dtype=float32)
    """
    _check_tree(params, masks)
    _check_bool(masks)
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), jnp.result_type(p))),
        masks,
        params,
        is_leaf=_is_none,
    )


def combine_masks(a: Masks, b: Masks) -> Masks:
    """Logical and of two mask trees; ``None`` (dense) is the identity.

    Args:
      a: mask tree.
      b: mask tree of the same structure and shapes.

    Returns:
      A mask tree keeping an entry only where both keep it; ``None`` where both
      are ``None``.

    >>> import jax.numpy as jnp
    >>> a = {"w": jnp.array([True, True, False]), "b": None}
    >>> b = {"w": jnp.array([True, False, True]), "b": None}
    >>> combine_masks(a, b)["w"]
    Array([ True, False, False], dtype=bool)
    """
    _check_tree(a, b, what="masks b", ref="masks a")
    _check_bool(a)
    _check_bool(b)

    def both(x, y):
        if x is None:
            return y
        if y is None:
            return x
        return jnp.logical_and(x, y)

    return jax.tree.map(both, a, b, is_leaf=_is_none)


def invert_masks(masks: Masks) -> Masks:
    """Swaps kept and pruned entries; ``None`` (dense) leaves stay ``None``.

    A dense leaf has no pruned entries to select, so the inverse of a ``None``
    leaf is left as ``None`` rather than an all-``False`` array of unknown shape.

    Args:
      masks: mask tree.

    Returns:
      A mask tree that is ``True`` exactly at the pruned entries of ``masks``.

    >>> import jax.numpy as jnp
    >>> invert_masks({"w": jnp.array([True, False])})["w"]
    Array([False,  True], dtype=bool)
    """
    _check_bool(masks)
    return jax.tree.map(
        lambda m: None if m is None else jnp.logical_not(m), masks, is_leaf=_is_none
    )


def mask_counts(tree: PyTree) -> PyTree:
    """Per-leaf number of non-zero entries (``True`` entries for masks).

    Args:
      tree: params or mask tree; ``None`` leaves stay ``None``.

    Returns:
      A tree of int32 scalars, one per array leaf.

    >>> import jax.numpy as jnp
    >>> mask_counts({"w": jnp.array([True, False, True]), "b": None})
    {'b': None, 'w': Array(2, dtype=int32)}
    """
    return jax.tree.map(
        lambda x: None if x is None else jnp.count_nonzero(x).astype(jnp.int32),
        tree,
        is_leaf=_is_none,
    )


def count_nonzero(tree: PyTree) -> jax.Array:
    """Total number of non-zero (or ``True``) entries over all leaves of a tree.

    .. math::

        \\mathrm{nnz} = \\sum_{\\ell} \\sum_i [x^{(\\ell)}_i \\neq 0]

    The count is int32 (exact below :math:`2^{31}` entries) so that it works
    under ``jit`` without ``jax_enable_x64``; :func:`summary` counts with Python
    integers for larger trees.

    Args:
      tree: params or mask tree; ``None`` leaves count nothing.

    Returns:
      An int32 scalar.

    >>> import jax.numpy as jnp
    >>> int(count_nonzero({"w": jnp.array([1.0, 0.0]), "m": jnp.array([True, True])}))
    3
    """
    counts = jax.tree.leaves(mask_counts(tree))
    return sum(counts, start=jnp.zeros((), jnp.int32))
