"""The 2-D view that every quantized tensor is stored in, and bit packing.

A tensor of any rank is seen as a matrix ``[K, N]`` whose rows run along the
contraction axes and whose columns are the channels:

* ``channel_axis=c``: the channel axis is moved last and the other axes are
  flattened in order, ``moveaxis(x, c, -1).reshape(-1, shape[c])``. For a Flax
  Dense kernel ``[in, out]`` with ``c=-1`` this is the kernel itself; for a conv
  kernel ``[h, w, in, out]`` it is ``[h * w * in, out]``.
* ``channel_axis=None`` (per tensor): the flattened tensor is one column,
  ``x.reshape(-1, 1)``.

Scales have shape ``[K // group_size, N]`` (``[1, N]`` without groups) and are
shared by ``group_size`` consecutive rows. Codes below 5 bits are packed into
``uint8`` along the rows: row ``r`` of the packed matrix holds rows
``r * p ... r * p + p - 1`` of the code matrix, the first in the lowest bits,
with ``p = 8 // slot`` codes per byte (``slot`` = 2 bits for 2-bit codes, 4 bits
for 3- and 4-bit codes). Packing along the rows keeps every column (output
channel) in its own bytes, so a kernel sharded over its output axis unpacks
without communication.

Unpacked int8 codes may also be stored in AMX tile order (``layout="amx"``, see
:func:`to_amx`), the order the native W8A8 kernel reads without repacking.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def codes_per_byte(bits: int) -> int:
    """How many ``bits``-bit codes one packed byte holds (1 means unpacked)."""
    if bits <= 2:
        return 4
    if bits <= 4:
        return 2
    return 1


def view_2d_shape(shape: tuple[int, ...], channel_axis: int | None) -> tuple[int, int]:
    """Shape ``(K, N)`` of the matrix view of a tensor of ``shape``."""
    size = math.prod(shape)
    if channel_axis is None:
        return size, 1
    n = shape[channel_axis]
    return (size // n if n else 0), n


def to_2d(x: jax.Array, channel_axis: int | None) -> jax.Array:
    """Matrix view ``[K, N]`` of ``x`` (see the module docstring)."""
    if channel_axis is None:
        return x.reshape(-1, 1)
    return jnp.moveaxis(x, channel_axis, -1).reshape(view_2d_shape(x.shape, channel_axis))


def from_2d(x2d: jax.Array, shape: tuple[int, ...], channel_axis: int | None) -> jax.Array:
    """Inverse of :func:`to_2d`: back to ``shape``."""
    if channel_axis is None:
        return x2d.reshape(shape)
    moved = tuple(d for i, d in enumerate(shape) if i != channel_axis) + (shape[channel_axis],)
    return jnp.moveaxis(x2d.reshape(moved), -1, channel_axis)


def grouped(x2d: jax.Array, groups: int) -> jax.Array:
    """``[K, N]`` -> ``[groups, K // groups, N]``: the rows that share a scale."""
    k, n = x2d.shape
    return x2d.reshape(groups, k // groups, n)


def pack(unsigned: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned ``[K, N]`` codes (values < ``2**bits``) into ``uint8`` rows."""
    per = codes_per_byte(bits)
    codes = unsigned.astype(jnp.uint8)
    k, n = codes.shape
    pad = -k % per
    codes = jnp.pad(codes, ((0, pad), (0, 0))).reshape(-1, per, n)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(8 // per))[None, :, None]
    return jnp.sum(codes << shifts, axis=1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int, rows: int) -> jax.Array:
    """Inverse of :func:`pack`: ``uint8`` codes of shape ``[rows, N]``."""
    per = codes_per_byte(bits)
    slot = 8 // per
    shifts = (jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(slot))[None, :, None]
    codes = (packed[:, None, :] >> shifts) & jnp.uint8((1 << slot) - 1)
    return codes.reshape(-1, packed.shape[1])[:rows]


AMX_TILE_K = 64  # k per tile row: 16 rows of four consecutive k
AMX_SLICE = 32  # output columns per slice: two 16-column tiles


def to_amx(codes: jax.Array) -> jax.Array:
    """int8 ``[K, N]`` codes in AMX tile order, ``[ceil(N / 32), ceil(K / 64) * 2048]``.

    Slice ``s`` (columns ``32 s`` to ``32 s + 31``) is one contiguous row: for each
    k-block ``kb`` of 64 rows, two 1 KiB tiles (columns ``+0-15`` and ``+16-31``)
    whose row ``r`` holds, for each of the 16 columns, the four codes of rows
    ``64 kb + 4 r + i`` (``i < 4``) side by side: the VNNI layout of
    ``TDPBSSD``'s second operand. Rows and columns past ``K`` and ``N`` are zero.
    """
    k, n = codes.shape
    kp, np_ = -(-k // AMX_TILE_K) * AMX_TILE_K, -(-n // AMX_SLICE) * AMX_SLICE
    padded = jnp.pad(codes, ((0, kp - k), (0, np_ - n)))
    # [kb, r, i, s, t, c] -> [s, kb, t, r, c, i]
    tiles = padded.reshape(kp // AMX_TILE_K, 16, 4, np_ // AMX_SLICE, 2, 16)
    return tiles.transpose(3, 0, 4, 1, 5, 2).reshape(np_ // AMX_SLICE, kp * AMX_SLICE)


def from_amx(tiles: jax.Array, k: int, n: int) -> jax.Array:
    """Inverse of :func:`to_amx`: the ``[K, N]`` codes."""
    slices, per_slice = tiles.shape
    kp = per_slice // AMX_SLICE
    blocks = tiles.reshape(slices, kp // AMX_TILE_K, 2, 16, 16, 4)
    return blocks.transpose(1, 3, 5, 0, 2, 4).reshape(kp, slices * AMX_SLICE)[:k, :n]
