"""Quantized matmuls: W8A8 int8 ``dot_general``, weight-only dequantize-in-jit, fp8.

Each function here has the signature of :func:`jax.lax.dot_general`
(``lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None``), so
it can be passed as ``nn.Dense(..., dot_general=...)`` or
``nnx.Linear(..., dot_general=...)``; ``lhs`` holds float activations and
``rhs`` the weights, either float (quantized on the fly) or a :class:`QArray`.
:mod:`jaxcomp.quant._execution` uses them to run unmodified Flax models whose
params hold QArrays.

References:
  Dettmers et al., LLM.int8(): 8-bit Matrix Multiplication for Transformers at
  Scale, 2022.
  Micikevicius et al., FP8 Formats for Deep Learning, 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import _layout
from jaxcomp.quant._qarray import QArray

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]

_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest float8_e4m3fn value


def quantize_activations(
    x: ArrayLike, axis: int | Sequence[int] = -1, *, fmt: str = "int8"
) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric quantization with one scale per token (per row over ``axis``).

    .. math::

        s = \\frac{\\max_{k} |x_{\\cdot k}|}{127}, \\qquad
        a = \\mathrm{clip}(\\mathrm{round}(x / s), -127, 127)

    with the max over the contraction axes ``axis`` (``s = 1`` for an all-zero
    row, so zeros stay exact). ``fmt="fp8_e4m3"`` uses 448 (the largest
    ``float8_e4m3fn``) instead of 127 and rounds to the nearest float8 value.

    Args:
      x: float activations.
      axis: the contraction axis or axes (reduced for the scale).
      fmt: ``"int8"`` or ``"fp8_e4m3"``.

    Returns:
      ``(codes, scale)``: ``int8`` (or ``float8_e4m3fn``) codes of ``x``'s shape
      and ``float32`` scales of ``x``'s shape with size 1 along ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> codes, scale = quantize_activations(jnp.array([[1.0, -2.0], [0.0, 0.0]]))
      >>> codes
      Array([[  64, -127],
             [   0,    0]], dtype=int8)
      >>> scale[:, 0]
      Array([0.01574803, 1.        ], dtype=float32)

    References:
      Dettmers et al., LLM.int8(): 8-bit Matrix Multiplication for Transformers
      at Scale, 2022.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize_activations expects float activations; got dtype {x.dtype}")
    if fmt not in ("int8", "fp8_e4m3"):
        raise ValueError(f"fmt is {fmt!r}; expected 'int8' or 'fp8_e4m3'")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    x32 = x.astype(jnp.float32)
    top = _INT8_MAX if fmt == "int8" else _FP8_MAX
    amax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / top, jnp.ones_like(amax))
    v = jnp.clip(x32 / scale, -top, top)
    if fmt == "int8":
        return jnp.round(v).astype(jnp.int8), scale
    return v.astype(jnp.float8_e4m3fn), scale


def _normalize_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int):
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in dims) for dims in (lc, rc, lb, rb))
    lc, lb = tuple(d % lhs_ndim for d in lc), tuple(d % lhs_ndim for d in lb)
    rc, rb = tuple(d % rhs_ndim for d in rc), tuple(d % rhs_ndim for d in rb)
    return lc, rc, lb, rb


def _to_output_layout(s, batch, contract, other_free: int, lead: bool) -> jax.Array:
    """Arranges keepdims scales of one operand like the ``dot_general`` output.

    The output is ``(batch, lhs free, rhs free)``; ``s`` has the operand's rank with
    size 1 on its contraction axes. ``lead`` says whether this operand's free axes
    come first (lhs) or last (rhs); ``other_free`` ones stand for the other side.
    """
    free = tuple(d for d in range(s.ndim) if d not in batch and d not in contract)
    s = jnp.transpose(s, batch + free + contract)
    s = s.reshape(s.shape[: len(batch) + len(free)])
    ones = (1,) * other_free
    if lead:
        return s.reshape(s.shape + ones)
    return s.reshape(s.shape[: len(batch)] + ones + s.shape[len(batch) :])


def _weight_codes(rhs, rc, fmt: str, name: str) -> tuple[jax.Array, jax.Array]:
    """8-bit weight codes in ``rhs``'s own shape and keepdims scales (1 on ``rc``)."""
    if isinstance(rhs, QArray):
        want = "int" if fmt == "int8" else "fp8_e4m3"
        if (
            rhs.bits != 8
            or rhs.fmt != want
            or rhs.zero_point is not None
            or rhs.group_size is not None
        ):
            raise ValueError(
                f"{name} needs a symmetric 8-bit {want!r} QArray without groups; got bits="
                f"{rhs.bits}, fmt={rhs.fmt!r}, group_size={rhs.group_size}, "
                f"symmetric={rhs.zero_point is None}; requantize it or use mode='weight_only'"
            )
        if rhs.channel_axis is not None and rhs.channel_axis in rc:
            raise ValueError(
                f"{name} needs scales constant along the contraction axes {rc}; the QArray "
                f"has channel_axis={rhs.channel_axis}; quantize with another channel_axis"
            )
        if fmt == "int8":
            codes = _layout.from_2d(rhs.codes, rhs.shape, rhs.channel_axis)
        else:
            values = _layout.from_2d(rhs.grid_values(), rhs.shape, rhs.channel_axis)
            codes = values.astype(jnp.float8_e4m3fn)
        scale_shape = [1] * rhs.ndim
        if rhs.channel_axis is not None:
            scale_shape[rhs.channel_axis] = rhs.shape[rhs.channel_axis]
        return codes, rhs.scale.reshape(scale_shape)
    rhs = jnp.asarray(rhs)
    if not jnp.issubdtype(rhs.dtype, jnp.floating):
        raise TypeError(f"{name} expects float weights or a QArray; got dtype {rhs.dtype}")
    return quantize_activations(rhs, rc, fmt=fmt)  # one scale per output channel


def _scaled_dot(lhs, rhs, dimension_numbers, preferred_element_type, out_sharding, fmt, name):
    lhs = jnp.asarray(lhs)
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(f"{name} expects float activations (lhs); got dtype {lhs.dtype}")
    lc, rc, lb, rb = _normalize_dims(dimension_numbers, lhs.ndim, len(rhs.shape))
    a, s_a = quantize_activations(lhs, lc, fmt=fmt)
    w, s_w = _weight_codes(rhs, rc, fmt, name)
    acc_type = jnp.int32 if fmt == "int8" else jnp.float32
    acc = jax.lax.dot_general(
        a, w, ((lc, rc), (lb, rb)), preferred_element_type=acc_type, out_sharding=out_sharding
    )
    n_lhs_free = lhs.ndim - len(lc) - len(lb)
    n_rhs_free = len(rhs.shape) - len(rc) - len(rb)
    s_a = _to_output_layout(s_a, lb, lc, n_rhs_free, lead=True)
    s_w = _to_output_layout(s_w, rb, rc, n_lhs_free, lead=False)
    y = acc.astype(jnp.float32) * (s_a * s_w)
    out = preferred_element_type
    if out is None or not jnp.issubdtype(out, jnp.floating):
        out = lhs.dtype
    return y.astype(out)


def w8a8_dot_general(
    lhs: ArrayLike,
    rhs: ArrayLike | QArray,
    dimension_numbers: DimensionNumbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
) -> jax.Array:
    """``lax.dot_general`` with int8 activations and weights and an int32 accumulator (W8A8).

    Activations get one dynamic scale per token (:func:`quantize_activations`
    over the lhs contraction axes); weights are a symmetric per-channel int8
    :class:`QArray` or a float array quantized here with one scale per output
    channel (absmax over the rhs contraction axes). Then

    .. math::

        y = s_a \\, s_w \\cdot \\sum_k a_k w_k \\quad (\\text{int8} \\times
        \\text{int8} \\to \\text{int32, rescaled in float32})

    and ``y`` is cast to the activation dtype (or a float
    ``preferred_element_type``). The compiled program holds an
    ``s8 x s8 -> s32`` dot.

    Args:
      lhs: float activations.
      rhs: weights: float, or a QArray with ``bits=8``, ``fmt="int"``, symmetric,
        no groups, and its ``channel_axis`` not contracted.
      dimension_numbers: as in :func:`jax.lax.dot_general`.
      precision: ignored (integer dots are exact).
      preferred_element_type: float output dtype; ``None`` or an integer type
        means the activation dtype.
      out_sharding: passed to :func:`jax.lax.dot_general` (``nnx.Linear`` gives it).

    Returns:
      The product, shaped like ``lax.dot_general``'s.

    Raises:
      ValueError: a QArray that is not symmetric int8 per channel/tensor.
      TypeError: integer activations or weights.

    Example:
      >>> import jax.numpy as jnp
      >>> x, w = jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 0.5], [-1.0, 2.0]])
      >>> y = w8a8_dot_general(x, w, (((1,), (0,)), ((), ())))
      >>> bool(jnp.allclose(y, x @ w, atol=0.02)), y.dtype
      (True, dtype('float32'))

    References:
      Dettmers et al., LLM.int8(): 8-bit Matrix Multiplication for Transformers
      at Scale, 2022.
    """
    del precision
    return _scaled_dot(
        lhs,
        rhs,
        dimension_numbers,
        preferred_element_type,
        out_sharding,
        "int8",
        "w8a8_dot_general",
    )


def fp8_dot_general(
    lhs: ArrayLike,
    rhs: ArrayLike | QArray,
    dimension_numbers: DimensionNumbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
) -> jax.Array:
    """``lax.dot_general`` on ``float8_e4m3fn`` operands with a float32 accumulator.

    Like :func:`w8a8_dot_general` with the float8 e4m3 grid (``|v| <= 448``):
    per-token activation scales ``max|x| / 448``, per-channel weight scales
    (a float array, or a QArray with ``fmt="fp8_e4m3"``),
    ``y = s_a s_w \\sum_k a_k w_k``. Backends with fp8 units (H100/H200, recent
    TPUs) run the dot in fp8; others (CPU) upcast inside the dot, which gives
    the same numbers without the speed.

    Args:
      lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding:
        as in :func:`w8a8_dot_general` (a QArray ``rhs`` must have ``fmt="fp8_e4m3"``).

    Returns:
      The product, shaped like ``lax.dot_general``'s.

    Example:
      >>> import jax.numpy as jnp
      >>> x, w = jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 0.5], [-1.0, 2.0]])
      >>> fp8_dot_general(x, w, (((1,), (0,)), ((), ()))).round(3)
      Array([[-1. ,  4.5]], dtype=float32)

    References:
      Micikevicius et al., FP8 Formats for Deep Learning, 2022.
    """
    del precision
    return _scaled_dot(
        lhs,
        rhs,
        dimension_numbers,
        preferred_element_type,
        out_sharding,
        "fp8_e4m3",
        "fp8_dot_general",
    )


def weight_only_dot_general(
    lhs: ArrayLike,
    rhs: QArray | ArrayLike,
    dimension_numbers: DimensionNumbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
) -> jax.Array:
    """``lax.dot_general`` with a quantized weight dequantized on the fly inside ``jit``.

    .. math::

        y = \\sum_k x_k \\, \\hat{w}_k, \\qquad \\hat{w} = (v - z) \\, s

    Any QArray works (2-8 bits, groups, zero points, fp8, NF4): only the packed
    codes and scales live in memory between calls; the float weight exists only
    inside the compiled program (XLA fuses the unpacking into the consumer where
    the backend can). Float ``rhs`` passes through unchanged.

    Args:
      lhs: float activations.
      rhs: a QArray (or a float array).
      dimension_numbers, precision, preferred_element_type, out_sharding: as in
        :func:`jax.lax.dot_general`.

    Returns:
      The product in the activation dtype (or ``preferred_element_type``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcomp.quant import quantize
      >>> q = quantize(jnp.array([[1.0, 0.5], [-1.0, 2.0]]), bits=4)
      >>> weight_only_dot_general(jnp.array([[1.0, 2.0]]), q, (((1,), (0,)), ((), ()))).round(3)
      Array([[-1.   ,  4.571]], dtype=float32)
    """
    lhs = jnp.asarray(lhs)
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise TypeError(f"weight_only_dot_general expects float activations; got {lhs.dtype}")
    w = rhs.dequantize() if isinstance(rhs, QArray) else jnp.asarray(rhs)
    out = preferred_element_type or lhs.dtype
    return jax.lax.dot_general(
        lhs,
        w.astype(lhs.dtype),
        dimension_numbers,
        precision,
        preferred_element_type=out,
        out_sharding=out_sharding,
    )


DOT_GENERALS = {
    "w8a8": w8a8_dot_general,
    "fp8": fp8_dot_general,
    "weight_only": weight_only_dot_general,
}
