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

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import _formats, _layout, _native
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


def _native_on_cpu(native, reference):
    """``native`` on a CPU, ``reference`` elsewhere; the gradients are always ``reference``'s.

    Both take the same arguments and give the same result; the native kernels
    are forward-only, so reverse-mode derivatives always come from ``reference``.
    """

    @jax.custom_vjp
    def call(*args):
        return jax.lax.platform_dependent(*args, cpu=native, default=reference)

    def forward(*args):
        return call(*args), args

    def backward(args, cotangent):
        return jax.vjp(reference, *args)[1](cotangent)

    call.defvjp(forward, backward)
    return call


def _matrix_view_dims(dims, lhs_ndim: int, rhs_shape, channel_axis) -> tuple[int, ...] | None:
    """The lhs contraction axes when ``lhs @ rhs`` is ``x2d [M, K] @ W [K, N]``, else ``None``.

    That is: no batch axes, and the rhs contraction axes are all its axes but
    ``channel_axis`` (the output axis), in order, as for a Dense kernel
    ``[in, out]`` or an Einsum kernel ``[a, b, out]``.
    """
    lc, rc, lb, rb = _normalize_dims(dims, lhs_ndim, len(rhs_shape))
    if lb or rb or channel_axis is None:
        return None
    if rc != tuple(d for d in range(len(rhs_shape)) if d != channel_axis):
        return None
    return lc


def _as_matrix(lhs: jax.Array, lc: tuple[int, ...]) -> jax.Array:
    """``lhs`` as ``[M, K]``: free axes flattened into rows, contraction axes into columns."""
    free = tuple(d for d in range(lhs.ndim) if d not in lc)
    m = math.prod(lhs.shape[d] for d in free)
    return jnp.transpose(lhs, free + lc).reshape(m, math.prod(lhs.shape[d] for d in lc))


def _w8a8_matrix(x2d: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """XLA's W8A8 of ``x2d [M, K]`` and int8 ``codes [K, N]`` with weight scales ``[1, N]``."""
    a, s_a = quantize_activations(x2d, 1)
    acc = jax.lax.dot_general(a, codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * (s_a * scale)


def _native_w8a8(x2d: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    return _native.w8a8_matmul(x2d, codes, scale)


def _native_prepacked_w8a8(x2d: jax.Array, tiles: jax.Array, scale: jax.Array) -> jax.Array:
    return _native.w8a8_matmul(x2d, tiles, scale, prepacked=True)


def _check_weight_qarray(rhs: QArray, rc, fmt: str, name: str) -> None:
    """Raises unless ``rhs`` is a symmetric 8-bit ``fmt`` QArray with scales constant on ``rc``."""
    want = "int" if fmt == "int8" else "fp8_e4m3"
    if rhs.bits != 8 or rhs.fmt != want or rhs.zero_point is not None or rhs.group_size is not None:
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


def _weight_codes(rhs, rc, fmt: str, name: str) -> tuple[jax.Array, jax.Array]:
    """8-bit weight codes in ``rhs``'s own shape and keepdims scales (1 on ``rc``)."""
    if isinstance(rhs, QArray):
        _check_weight_qarray(rhs, rc, fmt, name)
        if fmt == "int8":
            codes = _layout.from_2d(rhs.matrix_codes(), rhs.shape, rhs.channel_axis)
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
    native = fmt == "int8" and out_sharding is None and _native.native_status().w8a8
    channel = rhs.channel_axis if isinstance(rhs, QArray) else len(rhs.shape) - 1
    matrix_lc = _matrix_view_dims(dimension_numbers, lhs.ndim, rhs.shape, channel)
    if native and matrix_lc is not None:
        n = rhs.shape[channel]
        x2d = _as_matrix(lhs.astype(jnp.float32), matrix_lc)
        if isinstance(rhs, QArray) and rhs.layout == "amx":
            _check_weight_qarray(rhs, rc, fmt, name)
            k = x2d.shape[1]
            native_fn = _native_prepacked_w8a8
            reference = lambda x2d, tiles, scale: _w8a8_matrix(  # noqa: E731
                x2d, _layout.from_amx(tiles, k, n), scale
            )
            y = _native_on_cpu(native_fn, reference)(x2d, rhs.codes, rhs.scale.reshape(1, n))
        else:
            w, s_w = _weight_codes(rhs, rc, fmt, name)
            codes = jnp.moveaxis(w, channel, -1).reshape(x2d.shape[1], n)
            y = _native_on_cpu(_native_w8a8, _w8a8_matrix)(x2d, codes, s_w.reshape(1, n))
        free = tuple(lhs.shape[d] for d in range(lhs.ndim) if d not in matrix_lc)
        return y.reshape(free + (n,)).astype(_float_out(preferred_element_type, lhs.dtype))
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
    return y.astype(_float_out(preferred_element_type, lhs.dtype))


def _float_out(preferred_element_type, lhs_dtype):
    """The output dtype: a float ``preferred_element_type``, else the activation dtype."""
    if preferred_element_type is None or not jnp.issubdtype(preferred_element_type, jnp.floating):
        return lhs_dtype
    return preferred_element_type


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

    On a CPU with AMX-INT8, when the contraction is the weight's matrix view
    (a Dense or Einsum kernel, no batch axes), the native kernel of
    :mod:`jaxcomp.quant._native` runs instead: the same formula and exact int32
    sums, with ``x / s`` computed as a division, where XLA multiplies by the
    reciprocal (now and then a code differs by one); it reads
    weights stored by :func:`jaxcomp.quant.prepack` in place. Gradients come
    from XLA's lowering either way.

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


_BLOCK_BYTES = 2 << 20  # dequantized rows per scan step: about an L2 cache's worth
_TOKENS_PER_ROW = 4  # blocked form only while tokens * codes_per_byte <= 4 * block rows


def _block_rows(q: QArray, itemsize: int) -> int | None:
    """Rows of the matrix view dequantized per step, or ``None`` for one whole-matrix step.

    A block is a whole number of scale groups and of packed bytes, divides ``K``
    and holds at most ``_BLOCK_BYTES`` of dequantized weights; blocking is used
    only when it gives at least two blocks.
    """
    k, n = _layout.view_2d_shape(q.shape, q.channel_axis)
    if q.channel_axis is None or q.layout != "rows" or k * n * itemsize <= 2 * _BLOCK_BYTES:
        return None
    unit = q.group_size or _layout.codes_per_byte(q.bits)
    if q.group_size is not None and q.group_size % _layout.codes_per_byte(q.bits):
        return None
    most = max(_BLOCK_BYTES // (n * itemsize), 1)
    units = k // unit
    if units * unit != k:
        return None
    best = next(m for m in range(max(most // unit, 1), 0, -1) if units % m == 0)
    rows = best * unit
    return rows if k // rows >= 2 else None


def _blocked_dot(x2d: jax.Array, q: QArray, rows: int, acc_dtype, precision) -> jax.Array:
    """``x2d [M, K] @ dequantize(q) [K, N]``, dequantizing ``rows`` rows per ``lax.scan`` step.

    The dequantized block stays in cache between its unpacking and its dot, so
    only the packed codes travel from memory (the whole-matrix form writes and
    reads back a float32 ``[K, N]``). Packed codes are not interleaved back into
    rows: slot ``j`` of every byte (rows ``j, j + p, ...``) is dequantized on its
    own and multiplied by the matching strided columns ``x[:, j::p]``.
    """
    k, n = _layout.view_2d_shape(q.shape, q.channel_axis)
    blocks = k // rows
    per = _layout.codes_per_byte(q.bits) if q.packed else 1
    codes = q.codes.reshape(blocks, rows // per, n)
    xs = x2d.reshape(x2d.shape[0], blocks, rows).transpose(1, 0, 2)
    grouped = q.group_size is not None  # then each block has its own scale rows

    def per_block(a):
        if a is None or not grouped:
            return None
        return a.reshape(blocks, a.shape[0] // blocks, n)

    slot = 8 // per

    def step(acc, block):
        c, s, z, xb = block
        s, z = (s, z) if grouped else (q.scale, q.zero_point)
        for j in range(per):  # slot j of packed row r holds row r * per + j: no interleaving
            if q.packed:
                u = (c >> jnp.uint8(j * slot)) & jnp.uint8((1 << slot) - 1)
                v = _formats.from_unsigned(u, q.fmt, q.bits)
            elif q.fmt == "int":
                v = c.astype(jnp.float32)
            else:
                v = _formats.from_unsigned(c, q.fmt, q.bits)
            v = v.reshape(s.shape[0], -1, n)  # [groups in the block, rows // per per group, N]
            if z is not None:
                v = v - z.astype(jnp.float32)[:, None, :]
            w = (v * s[:, None, :]).reshape(-1, n)
            acc = acc + jax.lax.dot_general(
                xb[:, j::per],
                w.astype(q.dtype).astype(xb.dtype),
                (((1,), (0,)), ((), ())),
                precision,
                preferred_element_type=acc_dtype,
            )
        return acc, None

    acc = jnp.zeros((x2d.shape[0], n), acc_dtype)
    scanned = (codes, per_block(q.scale), per_block(q.zero_point), xs)
    return jax.lax.scan(step, acc, scanned)[0]


_NATIVE_MAX_TOKENS = 32  # past this the native weight-only kernel loses to XLA's float dot


def _lowbit_args(q: QArray) -> tuple[int, float] | None:
    """``(slot, offset)`` for the native weight-only kernel, or ``None`` when it can't take ``q``.

    It takes integer codes (2 to 8 bits, any zero points, groups of whole packed
    bytes): 2- to 4-bit codes packed in ``slot``-bit slots with unsigned offset
    ``2^(bits - 1)``, 5- to 8-bit codes as int8 (slot 8, offset 0).
    """
    if q.fmt != "int" or q.channel_axis is None or q.layout != "rows":
        return None
    k, _ = _layout.view_2d_shape(q.shape, q.channel_axis)
    per = _layout.codes_per_byte(q.bits) if q.packed else 1
    group_rows = k // q.scale.shape[0]
    if q.codes.shape[0] * per != k or group_rows * q.scale.shape[0] != k or group_rows % per:
        return None
    return (8 // per, float(1 << (q.bits - 1)) if q.packed else 0.0)


def _blocked_rows_for(q: QArray, tokens: int) -> int | None:
    """Rows per block for :func:`_blocked_dot` when blocking pays for ``tokens``, else ``None``."""
    rows = _block_rows(q, 4)
    per = _layout.codes_per_byte(q.bits) if q.packed else 1
    # each block costs one [tokens, N] accumulation per slot: past about 4 * rows / per
    # tokens that traffic exceeds the one-off float weight (measured: 512 tokens lose)
    if rows is None or tokens * per > _TOKENS_PER_ROW * rows:
        return None
    return rows


def _weight_only_matrix(x2d: jax.Array, q: QArray, precision=None) -> jax.Array:
    """XLA's ``x2d [M, K] @ dequantize(q)`` in float32 for a QArray in matrix-view form."""
    rows = _blocked_rows_for(q, x2d.shape[0])
    if rows is not None:
        return _blocked_dot(x2d, q, rows, jnp.float32, precision)
    w = _layout.to_2d(q.dequantize().astype(jnp.float32), q.channel_axis)
    return jax.lax.dot_general(
        x2d, w, (((1,), (0,)), ((), ())), precision, preferred_element_type=jnp.float32
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
    inside the compiled program. When the contraction runs over the rows of the
    QArray's matrix view (a Dense kernel ``[in, out]``, an Einsum kernel whose
    only free axis is ``channel_axis``), the float weight would exceed 4 MiB and
    the tokens are few (at most ``4 * rows / codes_per_byte``: 256 for int4
    group 128 with 4096 outputs, i.e. decoding and small batches), the rows are
    dequantized in blocks of ``rows`` (whole groups, about 2 MiB of float32)
    inside a ``lax.scan`` that accumulates ``x_block @ w_block`` in float32, so
    each block is used while it is in cache (for packed codes, one dot per slot
    of the byte, so nibbles are never interleaved); otherwise the whole weight
    is dequantized before one dot. On a CPU with AVX-512, integer codes (2-8
    bits) in that matrix-view case with at most 32 tokens go to the native
    kernel instead (:mod:`jaxcomp.quant._native`), which unpacks the codes in
    registers. All give the float dot of the dequantized weight up to float32
    summation order. Float ``rhs`` passes through unchanged.

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
    out = preferred_element_type or lhs.dtype
    lc = None
    if isinstance(rhs, QArray) and out_sharding is None and jnp.issubdtype(out, jnp.floating):
        lc = _matrix_view_dims(dimension_numbers, lhs.ndim, rhs.shape, rhs.channel_axis)
    if lc is not None:
        x2d = _as_matrix(lhs, lc)
        n = rhs.shape[rhs.channel_axis]
        free = tuple(lhs.shape[d] for d in range(lhs.ndim) if d not in lc)
        lowbit = _lowbit_args(rhs)
        if (
            lowbit is not None
            and x2d.shape[0] <= _NATIVE_MAX_TOKENS
            and _native.native_status().lowbit
        ):
            slot, offset = lowbit

            def native(x2d, q):
                return _native.lowbit_matmul(
                    x2d, q.codes, q.scale, q.zero_point, slot=slot, offset=offset
                )

            def reference(x2d, q):
                return _weight_only_matrix(x2d.astype(jnp.float32), q, precision)

            y = _native_on_cpu(native, reference)(x2d, rhs)
            return y.reshape(free + (n,)).astype(out)
        rows = _blocked_rows_for(rhs, x2d.shape[0])
        if rows is not None:
            acc_dtype = out if jnp.finfo(out).bits >= 32 else jnp.float32
            y = _blocked_dot(x2d, rhs, rows, acc_dtype, precision)
            return y.reshape(free + (n,)).astype(out)
    w = rhs.dequantize() if isinstance(rhs, QArray) else jnp.asarray(rhs)
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
