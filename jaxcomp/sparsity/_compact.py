"""Compact storage of sparse weights: N:M packed (values + 2-bit indices) and bitmask.

Both formats are frozen dataclasses registered with
``jax.tree_util.register_dataclass``: the arrays are pytree children (they
jit, shard and save like any leaf), the shape and the pattern are static,
JSON-serialisable meta fields. ``.nbytes`` is the bytes the arrays hold and
``.to_dense()`` rebuilds the dense array exactly (bit for bit, ``-0.0`` and NaN
payloads of kept entries included).

Register them with :func:`jaxcomp.checkpoint.register_node_type` so that
:func:`jaxcomp.checkpoint.save` / ``restore`` store the packed arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxcomp.rules import PyTree, path_str
from jaxcomp.sparsity._masks import Masks, Params, _check_bool, _check_tree, _is_none
from jaxcomp.sparsity._patterns import _check_leaf, _parse_pattern
from jaxcomp.sparsity._select import _keep_top_in_groups


def _index_bits(m: int) -> int:
    """Bits per stored index: the smallest of 1, 2, 4, 8 that holds ``0 .. m-1``."""
    need = max(1, math.ceil(math.log2(m)))
    return next(b for b in (1, 2, 4, 8) if b >= need)


def _pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned ``codes < 2**bits`` (any shape) into a flat uint8 array, low bits first."""
    per_byte = 8 // bits
    flat = codes.reshape(-1).astype(jnp.uint8)
    pad = (-flat.size) % per_byte
    flat = jnp.pad(flat, (0, pad)).reshape(-1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    return jnp.sum(flat << shifts, axis=1, dtype=jnp.uint8)


def _unpack(packed: jax.Array, bits: int, size: int) -> jax.Array:
    """Inverse of :func:`_pack`: the first ``size`` codes as uint8."""
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    low = jnp.uint8((1 << bits) - 1)
    return ((packed[:, None] >> shifts) & low).reshape(-1)[:size]


def _arrays_nbytes(*arrays: jax.Array) -> int:
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays)


@dataclasses.dataclass(frozen=True)
class NMSparse:
    """An N:M sparse kernel: the N kept values of every group of M, and their packed positions.

    The kernel is read as the matrix ``[K, C]`` (``C`` the last axis, ``K`` the
    others flattened; groups run along ``K``). ``values`` is ``[K * N / M, C]``
    in the kernel's dtype (for each group, the kept entries in increasing
    position); ``indices`` holds each kept entry's position in its group,
    ``ceil(log2 M)`` bits rounded up to 1/2/4/8 bits (2 bits for 2:4), packed
    into uint8. Build it with :func:`to_nm_sparse`.
    """

    values: jax.Array
    indices: jax.Array
    shape: tuple[int, ...]
    n: int
    m: int

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the dense array (that of ``values``)."""
        return jnp.dtype(self.values.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus packed indices."""
        return _arrays_nbytes(self.values, self.indices)

    def to_dense(self) -> jax.Array:
        """The dense array, exactly (zeros at the pruned entries)."""
        k, c = math.prod(self.shape[:-1]), self.shape[-1]
        groups = k // self.m
        slots = _unpack(self.indices, _index_bits(self.m), groups * self.n * c)
        slots = slots.reshape(groups, self.n, c).astype(jnp.int32)
        values = self.values.reshape(groups, self.n, c)
        dense = jnp.zeros((groups, self.m, c), self.values.dtype)
        g = jnp.arange(groups)[:, None, None]
        col = jnp.arange(c)[None, None, :]
        return dense.at[g, slots, col].set(values).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class BitmaskSparse:
    """A sparse array as a packed bitmask (1 bit per entry) plus its kept values in order.

    ``bits`` is ``np.packbits(mask.ravel(), bitorder="little")``; ``values`` holds
    the entries where the mask is set, in row-major order, padded with zeros to a
    fixed capacity (so the format jits: the capacity is a static shape). Build
    it with :func:`to_bitmask_sparse`.
    """

    bits: jax.Array
    values: jax.Array
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the dense array (that of ``values``)."""
        return jnp.dtype(self.values.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed bitmask plus values."""
        return _arrays_nbytes(self.bits, self.values)

    def mask(self) -> jax.Array:
        """The bool mask (``True`` = stored entry) in the dense shape."""
        size = math.prod(self.shape)
        return _unpack(self.bits, 1, size).astype(jnp.bool_).reshape(self.shape)

    def to_dense(self) -> jax.Array:
        """The dense array, exactly (zeros where the mask is unset)."""
        mask = self.mask().reshape(-1)
        if self.values.size == 0:
            return jnp.zeros(self.shape, self.values.dtype)
        position = jnp.cumsum(mask, dtype=jnp.int32) - 1
        gathered = self.values[jnp.clip(position, 0, self.values.size - 1)]
        zero = jnp.zeros((), self.values.dtype)
        return jnp.where(mask, gathered, zero).reshape(self.shape)


for _cls, _data in ((NMSparse, ["values", "indices"]), (BitmaskSparse, ["bits", "values"])):
    _meta = [f.name for f in dataclasses.fields(_cls) if f.name not in _data]
    jax.tree_util.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)

_COMPACT = (NMSparse, BitmaskSparse)


def _is_compact(x: Any) -> bool:
    return isinstance(x, _COMPACT)


def to_nm_sparse(x: ArrayLike, n: int, m: int, mask: ArrayLike | None = None) -> NMSparse:
    """Packs a kernel into the N:M format, keeping N entries of every M along the contraction axes.

    Without ``mask`` the N largest :math:`|x|` of each group are kept (ties: the
    lower position), so an array that already has at most N non-zeros per group
    round-trips exactly. With ``mask`` (bool, exactly N ``True`` per group, e.g.
    from ``compute_masks(pattern="2:4")``) those entries are kept. Works under ``jit``.

    .. math::

        \\text{bytes} = K C \\tfrac{N}{M} \\cdot \\text{itemsize}
        + \\lceil K C \\tfrac{N}{M} \\cdot b / 8 \\rceil, \\quad b = 2 \\text{ for } M = 4

    Args:
      x: array of rank >= 2 whose contraction size (all axes but the last) is divisible by ``m``.
      n: entries kept per group, ``0 < n < m``.
      m: group length, ``m <= 256``.
      mask: optional N:M mask of ``x``'s shape.

    Returns:
      An :class:`NMSparse`.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0], [2.0], [0.0], [-1.0]])
    >>> s = to_nm_sparse(x, 2, 4)
    >>> s.values.ravel(), s.nbytes, bool((s.to_dense() == x).all())
    (Array([ 2., -1.], dtype=float32), 9, True)

    References: Mishra et al., Accelerating Sparse Deep Neural Networks, 2021.
    """
    x = jnp.asarray(x)
    pattern = _parse_pattern(f"{n}:{m}") if isinstance(n, int) and isinstance(m, int) else None
    if pattern is None or m > 256:
        raise ValueError(f"N:M needs ints 0 < n < m <= 256; got n={n!r}, m={m!r}")
    _check_leaf("x", tuple(x.shape), pattern, "layer")
    shape = tuple(int(d) for d in x.shape)
    k, c = math.prod(shape[:-1]), shape[-1]
    matrix = x.reshape(k, c)
    if mask is None:
        keep = _keep_top_in_groups(jnp.abs(matrix), n, m)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape or mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask has shape {mask.shape} and dtype {mask.dtype}; expected bool {x.shape}"
            )
        keep = mask.reshape(k, c)
    groups = k // m
    keep = keep.reshape(groups, m, c)
    # Order the positions of a group kept-first, then by position: slot s holds the s-th. A
    # group with fewer than n kept entries fills its last slots with distinct pruned positions
    # and stores zeros there, so positions never repeat.
    position = jnp.arange(m, dtype=jnp.int32)[None, :, None]
    order = jnp.where(keep, 0, m) + position
    rank = jnp.sum(order[:, None, :, :] < order[:, :, None, :], axis=2, dtype=jnp.int32)
    slot = jnp.arange(n, dtype=jnp.int32)[None, None, :, None]
    hit = rank[:, :, None, :] == slot
    slots = jnp.sum(jnp.where(hit, position[..., None], 0), axis=1, dtype=jnp.int32)
    values = jnp.take_along_axis(matrix.reshape(groups, m, c), slots, axis=1)
    kept = jnp.take_along_axis(keep, slots, axis=1)
    values = jnp.where(kept, values, jnp.zeros((), x.dtype))
    packed = _pack(slots, _index_bits(m))
    return NMSparse(values.reshape(groups * n, c), packed, shape, n, m)


def to_bitmask_sparse(
    x: ArrayLike, mask: ArrayLike | None = None, *, capacity: int | None = None
) -> BitmaskSparse:
    """Packs an array as a bitmask of its stored entries plus their values.

    .. math::

        \\text{bytes} = \\lceil \\mathrm{size} / 8 \\rceil
        + \\mathrm{capacity} \\cdot \\text{itemsize}

    Args:
      x: any array.
      mask: bool mask of ``x``'s shape (``True`` = stored); default ``x != 0``.
      capacity: number of value slots; default the mask's count (needs concrete
        values: pass it under ``jit``). Must be at least that count, else entries are lost.

    Returns:
      A :class:`BitmaskSparse`.

    >>> import jax.numpy as jnp
    >>> s = to_bitmask_sparse(jnp.array([0.0, 3.0, 0.0, 0.0, -1.0]))
    >>> s.values, s.bits, bool((s.to_dense() == jnp.array([0.0, 3.0, 0.0, 0.0, -1.0])).all())
    (Array([ 3., -1.], dtype=float32), Array([18], dtype=uint8), True)
    """
    x = jnp.asarray(x)
    if mask is None:
        mask = x != 0
    mask = jnp.asarray(mask)
    if mask.shape != x.shape or mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask has shape {mask.shape} and dtype {mask.dtype}; expected bool {x.shape}"
        )
    flat, flat_mask = x.reshape(-1), mask.reshape(-1)
    if capacity is None:
        try:
            capacity = int(jnp.count_nonzero(flat_mask))
        except jax.errors.ConcretizationTypeError:
            raise ValueError("to_bitmask_sparse under jit needs capacity=") from None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity is {capacity!r}; expected an int >= 0")
    (where,) = jnp.nonzero(flat_mask, size=capacity, fill_value=0)
    slot_used = jnp.arange(capacity) < jnp.count_nonzero(flat_mask)
    values = jnp.where(slot_used, flat[where], jnp.zeros((), x.dtype))
    return BitmaskSparse(_pack(flat_mask, 1), values, tuple(int(d) for d in x.shape))


def compress_tree(params: Params, masks: Masks, *, format: str = "bitmask") -> PyTree:
    """Replaces every pruned leaf (mask not ``None``) by its compact form.

    Args:
      params: params pytree.
      masks: mask tree of ``params`` (``None`` = keep the leaf dense).
      format: ``"bitmask"`` (any mask: :class:`BitmaskSparse`) or ``"N:M"`` such
        as ``"2:4"`` (masks must be N:M: :class:`NMSparse`).

    Returns:
      A tree like ``params`` with :class:`BitmaskSparse` / :class:`NMSparse` nodes
      at the pruned leaves; :func:`decompress_tree` inverts it exactly.

    Raises:
      ValueError: ``masks`` do not match ``params`` (the leaf is named), an
        unknown format, or a leaf shape the N:M format cannot tile.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0], [0.0, 4.0]])
    >>> params = {"w": w, "b": jnp.ones(2)}
    >>> masks = {"w": params["w"] != 0, "b": None}
    >>> packed = compress_tree(params, masks, format="2:4")
    >>> type(packed["w"]).__name__, bool((decompress_tree(packed)["w"] == params["w"]).all())
    ('NMSparse', True)
    """
    _check_tree(params, masks)
    _check_bool(masks)
    if format == "bitmask":
        pattern = None
    else:
        nm = isinstance(format, str) and format.count(":") == 1 and "block" not in format
        pattern = _parse_pattern(format) if nm else None
        if pattern is None or pattern.kind != "n:m":
            raise ValueError(f"unknown format {format!r}; allowed: 'bitmask' or 'N:M' like '2:4'")

    def one(path, m, p):
        if m is None:
            return p
        if pattern is None:
            return to_bitmask_sparse(p, m)
        _check_leaf(path_str(path), tuple(jnp.shape(p)), pattern, "layer")
        return to_nm_sparse(p, pattern.n, pattern.m, m)

    return jax.tree_util.tree_map_with_path(one, masks, params, is_leaf=_is_none)


def decompress_tree(tree: PyTree) -> Params:
    """Replaces every :class:`NMSparse` / :class:`BitmaskSparse` node by its dense array.

    Args:
      tree: a tree from :func:`compress_tree` (other leaves pass through).

    Returns:
      The dense params tree.

    >>> import jax.numpy as jnp
    >>> decompress_tree({"w": to_bitmask_sparse(jnp.array([0.0, 2.0]))})["w"]
    Array([0., 2.], dtype=float32)
    """
    return jax.tree.map(lambda x: x.to_dense() if _is_compact(x) else x, tree, is_leaf=_is_compact)
