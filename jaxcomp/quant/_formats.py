"""Code formats: the integer grid, fp8 (e4m3 / e5m2) and NF4, and how each is stored.

Every format is a set of grid values ``v`` in the *scaled* domain (the tensor is
``x ~ (v - z) * s``) and a way to store them as unsigned codes ``u < 2^bits``:

* ``"int"``: ``v`` is an integer in ``[-2^(b-1), 2^(b-1) - 1]``; ``u = v + 2^(b-1)``
  when packed, else the signed value itself is kept as ``int8``.
* ``"fp8_e4m3"`` / ``"fp8_e5m2"``: ``v`` is a float8 number (``|v| <= 448`` /
  ``57344``); ``u`` is its bit pattern (``uint8``).
* ``"nf4"``: ``v`` is one of the 16 NormalFloat levels in ``[-1, 1]`` (QLoRA);
  ``u`` is its index, two per byte.

References:
  Micikevicius et al., FP8 Formats for Deep Learning, 2022.
  Dettmers et al., QLoRA: Efficient Finetuning of Quantized LLMs, 2023.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "nf4")
FORMAT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "nf4": 4}  # fixed widths of the non-int formats
_FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def int_grid(bits: int) -> tuple[int, int]:
    """The signed integer grid ``(qmin, qmax) = (-2^(b-1), 2^(b-1) - 1)``."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def grid_max(fmt: str, bits: int) -> float:
    """Largest positive grid value: what a symmetric scale maps the clipping bound to."""
    if fmt == "int":
        return float(int_grid(bits)[1])
    if fmt == "nf4":
        return 1.0
    return float(jnp.finfo(_FP8[fmt]).max)


def _nf4_index(v: jax.Array) -> jax.Array:
    """Index of the nearest NF4 level (the lower one on a tie)."""
    mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    return jnp.searchsorted(mids, v, side="left").astype(jnp.uint8)


def snap(v: jax.Array, fmt: str) -> jax.Array:
    """Nearest grid value of a non-int format for scaled float32 values (saturating)."""
    if fmt == "nf4":
        return jnp.asarray(NF4_LEVELS)[_nf4_index(v)]
    top = grid_max(fmt, 8)
    return jnp.clip(v, -top, top).astype(_FP8[fmt]).astype(jnp.float32)


def to_unsigned(v: jax.Array, fmt: str, bits: int) -> jax.Array:
    """Unsigned codes ``[K, N]`` of grid values ``v`` (see the module docstring)."""
    if fmt == "int":
        return (v.astype(jnp.int32) - int_grid(bits)[0]).astype(jnp.uint8)
    if fmt == "nf4":
        return _nf4_index(v)
    return jax.lax.bitcast_convert_type(v.astype(_FP8[fmt]), jnp.uint8)


def from_unsigned(u: jax.Array, fmt: str, bits: int) -> jax.Array:
    """Grid values (float32) of unsigned codes; inverse of :func:`to_unsigned`."""
    if fmt == "int":
        return (u.astype(jnp.int32) + int_grid(bits)[0]).astype(jnp.float32)
    if fmt == "nf4":
        return jnp.asarray(NF4_LEVELS)[u.astype(jnp.int32)]
    return jax.lax.bitcast_convert_type(u, _FP8[fmt]).astype(jnp.float32)
