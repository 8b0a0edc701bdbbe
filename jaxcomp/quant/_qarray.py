"""``QArray``: a quantized tensor as a pytree node (codes, scales, zero points)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import _formats, _layout

LAYOUTS = ("rows", "amx")  # orders of QArray.codes: the matrix view, or AMX tile order


@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
    """A quantized tensor: codes plus the scales (and zero points) that map them back.

    With grid values ``v`` (the integer codes for ``fmt="int"``, float8 numbers
    or NF4 levels otherwise), scale ``s`` and zero point ``z``:

    .. math::

        \\hat{x} = (v - z) \\cdot s

    with ``z = 0`` when ``zero_point`` is ``None`` (symmetric). Every array is
    stored in the matrix view ``[K, N]`` of :mod:`jaxcomp.quant._layout`
    (channels last, contraction axes flattened; one column per tensor):

    * ``codes``: ``int8 [K, N]`` signed integer codes for ``fmt="int"`` with 5 to
      8 bits; ``uint8 [K, N]`` float8 bit patterns for the fp8 formats; for 2 to
      4 bits (``fmt="int"`` or ``"nf4"``) ``uint8 [ceil(K / p), N]`` bytes packed
      along the rows, with the unsigned codes ``v + 2^(b-1)`` (int) or level
      indices (NF4) in 2-bit (2-bit codes, ``p = 4``) or 4-bit slots (``p = 2``).
    * ``scale``: ``float32 [G, N]`` with ``G = K // group_size`` (1 without groups;
      ``N = 1`` per tensor).
    * ``zero_point``: ``None`` (symmetric) or ``int8 [G, N]`` on the signed grid.

    ``layout="amx"`` (made by :func:`jaxcomp.quant.prepack`, only for symmetric
    int8 codes with one scale per channel) keeps the codes in AMX tile order
    (:func:`jaxcomp.quant._layout.to_amx`) instead of ``[K, N]``.

    Data fields (``codes``, ``scale``, ``zero_point``) are pytree children; the
    other fields are static metadata made of plain JSON values, so a QArray
    passes through ``jit``/``pmap``/sharding and a checkpoint can rebuild it with
    ``QArray(**data, **meta)`` (lists read back from JSON become tuples).

    Attributes:
      bits: code width, 2 to 8.
      shape: shape of the original tensor.
      dtype: name of the original dtype (``"float32"``, ``"bfloat16"``, ...);
        ``jnp.dtype(q.dtype)`` gives the dtype object.
      channel_axis: axis of the original tensor with a scale per entry
        (non-negative), or ``None`` for per-tensor scales.
      group_size: rows of the matrix view sharing one scale, or ``None``.
      packed: whether ``codes`` holds several codes per byte.
      fmt: code format: ``"int"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"nf4"``.
      layout: order of ``codes``: ``"rows"`` (the matrix view) or ``"amx"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcomp.quant import quantize
      >>> q = quantize(jnp.ones((4, 3)), bits=8)
      >>> q.shape, q.dtype, q.nbytes
      ((4, 3), 'float32', 24)
    """

    DATA_FIELDS: ClassVar[tuple[str, ...]] = ("codes", "scale", "zero_point")
    META_FIELDS: ClassVar[tuple[str, ...]] = (
        "bits",
        "shape",
        "dtype",
        "channel_axis",
        "group_size",
        "packed",
        "fmt",
        "layout",
    )

    codes: Any
    scale: Any
    zero_point: Any = None
    bits: int
    shape: tuple[int, ...]
    dtype: str
    channel_axis: int | None
    group_size: int | None = None
    packed: bool = False
    fmt: str = "int"
    layout: str = "rows"

    def __post_init__(self):
        # Only metadata is normalised: pytree unflattening may pass placeholder children.
        set_ = object.__setattr__
        set_(self, "bits", int(self.bits))
        set_(self, "shape", tuple(int(d) for d in self.shape))
        set_(self, "dtype", jnp.dtype(self.dtype).name)
        if self.channel_axis is not None:
            set_(self, "channel_axis", int(self.channel_axis))
        if self.group_size is not None:
            set_(self, "group_size", int(self.group_size))
        set_(self, "packed", bool(self.packed))
        if self.fmt not in _formats.FORMATS:
            raise ValueError(f"QArray fmt is {self.fmt!r}; expected one of {_formats.FORMATS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"QArray layout is {self.layout!r}; expected one of {LAYOUTS}")
        if self.layout == "amx" and not self.amx_eligible:
            raise ValueError(
                "QArray layout 'amx' holds symmetric int8 codes with one scale per channel; got "
                f"bits={self.bits}, fmt={self.fmt!r}, group_size={self.group_size}, "
                f"channel_axis={self.channel_axis}"
            )

    @property
    def amx_eligible(self) -> bool:
        """Whether the codes can take ``layout="amx"`` (the W8A8 kind: int8, per channel).

        Symmetry (no zero point) is checked where the codes are converted, since
        pytree unflattening may pass placeholder children here.
        """
        return (
            self.bits == 8
            and self.fmt == "int"
            and self.group_size is None
            and self.channel_axis is not None
        )

    def matrix_codes(self) -> jax.Array:
        """The codes in the matrix view ``[K, N]`` (packed bytes for 2-4 bits), any layout."""
        if self.layout == "amx":
            k, n = _layout.view_2d_shape(self.shape, self.channel_axis)
            return _layout.from_amx(self.codes, k, n)
        return self.codes

    @classmethod
    def from_grid(
        cls,
        values: ArrayLike,
        scale: ArrayLike,
        zero_point: ArrayLike | None = None,
        *,
        bits: int,
        shape: tuple[int, ...],
        dtype: str,
        channel_axis: int | None,
        group_size: int | None = None,
        fmt: str = "int",
    ) -> QArray:
        """Builds a QArray from grid values in the matrix view, encoding and packing them.

        Args:
          values: ``[K, N]`` grid values: integers in ``[-2^(bits-1), 2^(bits-1) - 1]``
            (any int or float dtype) for ``fmt="int"``, float8-representable
            numbers for fp8, NF4 levels for ``"nf4"``.
          scale: ``[G, N]`` scales.
          zero_point: ``None`` or ``[G, N]`` zero points on the integer grid.
          bits, shape, dtype, channel_axis, group_size, fmt: the metadata fields.

        Returns:
          The QArray, with codes packed into ``uint8`` for ``bits <= 4``.
        """
        values = jnp.asarray(values)
        packed = _layout.codes_per_byte(bits) > 1
        if packed:
            stored = _layout.pack(_formats.to_unsigned(values, fmt, bits), bits)
        elif fmt == "int":
            stored = values.astype(jnp.int8)
        else:
            stored = _formats.to_unsigned(values.astype(jnp.float32), fmt, bits)
        return cls(
            codes=stored,
            scale=jnp.asarray(scale).astype(jnp.float32),
            zero_point=None if zero_point is None else jnp.asarray(zero_point).astype(jnp.int8),
            bits=bits,
            shape=shape,
            dtype=dtype,
            channel_axis=channel_axis,
            group_size=group_size,
            packed=packed,
            fmt=fmt,
        )

    @property
    def ndim(self) -> int:
        """Rank of the original tensor."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes really held: codes + scales + zero points (measured from the arrays)."""
        arrays = [a for a in (self.codes, self.scale, self.zero_point) if a is not None]
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)

    def grid_values(self) -> jax.Array:
        """The grid values ``v`` as ``float32 [K, N]`` (integer codes for ``fmt="int"``)."""
        if self.packed:
            rows, _ = _layout.view_2d_shape(self.shape, self.channel_axis)
            unsigned = _layout.unpack(self.codes, self.bits, rows)
            return _formats.from_unsigned(unsigned, self.fmt, self.bits)
        if self.fmt == "int":
            return self.matrix_codes().astype(jnp.float32)
        return _formats.from_unsigned(self.codes, self.fmt, self.bits)

    def dequantize(self) -> jax.Array:
        """The tensor the codes stand for, in the original shape and dtype."""
        v = _layout.grouped(self.grid_values(), self.scale.shape[0])
        if self.zero_point is not None:
            v = v - self.zero_point.astype(jnp.float32)[:, None, :]
        x = v * self.scale.astype(jnp.float32)[:, None, :]
        x = x.reshape(v.shape[0] * v.shape[1], v.shape[2])
        return _layout.from_2d(x, self.shape, self.channel_axis).astype(self.dtype)


jax.tree_util.register_dataclass(
    QArray, data_fields=list(QArray.DATA_FIELDS), meta_fields=list(QArray.META_FIELDS)
)
