"""GPTQ: post-training quantization of one kernel with second-order error feedback."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.ptq import _factor
from jaxcomp.quant import QArray, QuantConfig, _calibrate, _formats

BLOCK = 128


def block_rows(group_size: int | None, block: int = BLOCK) -> int:
    """Rows per lazy-update block: ``block``, or a multiple of the group size near it."""
    if group_size is None:
        return block
    return group_size * max(1, block // group_size)


def quant_row(w, scale, zero, bits: int):
    """Round-to-nearest of one row, dequantized: ``(clip(round(w / s) + z) - z) s``."""
    qmin, qmax = _formats.int_grid(bits)
    v = jnp.round(w / scale)
    if zero is None:
        return jnp.clip(v, qmin, qmax) * scale
    return (jnp.clip(v + zero, qmin, qmax) - zero) * scale


def grid_values(q2d, scale, zero, bits: int):
    """Grid values of dequantized rows ``[K, N]`` given ``[G, N]`` params (exact inverse)."""
    groups, n = scale.shape
    qg = q2d.reshape(groups, -1, n)
    v = jnp.round(qg / scale[:, None, :])
    if zero is not None:
        v = v + zero[:, None, :]
    qmin, qmax = _formats.int_grid(bits)
    return jnp.clip(v, qmin, qmax).reshape(q2d.shape)


@functools.partial(jax.jit, static_argnames=("config", "act_order", "block", "retry"))
def gptq_core(
    w2d, hessian, damp, *, config: QuantConfig, act_order: bool, block: int, retry: bool = True
):
    """Jitted GPTQ on the ``[K, N]`` view; returns ``(values, scale, zero, ok)``.

    ``values`` are grid values in the original row order; ``ok`` is ``False``
    when the Cholesky failed at every damping (the caller falls back to RTN).
    """
    with jax.default_matmul_precision("highest"):
        rows, n = w2d.shape
        g = config.group_size
        groups = rows // g if g else 1
        hessian = hessian.astype(jnp.float32)
        dead = jnp.diagonal(hessian) == 0
        w2d = jnp.where(dead[:, None], 0.0, w2d)
        if act_order:
            perm = jnp.argsort(-jnp.diagonal(hessian), stable=True)
            hessian = hessian[perm][:, perm]
        else:
            perm = jnp.arange(rows)
        u, w_p, ok = _factor.inverse_factor(hessian, w2d[perm], damp, retry)
        w_pad, u_pad = _factor.pad_rows(w_p, u, block)
        kp = w_pad.shape[0]
        dynamic = g is not None and not act_order
        if dynamic:
            sub = g

            def start_fn(rows_, dsub, r0):
                del dsub, r0
                s, z = _calibrate.grouped_params(rows_[None], config)
                return (s[0],) if z is None else (s[0], z[0])

            def row_fn(w, state, j, row):
                del j, row
                return quant_row(w, state[0], state[1] if len(state) > 1 else None, config.bits)

        else:
            # Static scales from the kernel in the original order ("static groups").
            sub = block
            scale, zero = _calibrate.grouped_params(w2d.reshape(groups, rows // groups, n), config)
            group_of_row = jnp.pad(perm // (rows // groups), (0, kp - rows))

            def start_fn(rows_, dsub, r0):
                del rows_, dsub, r0
                return ()

            def row_fn(w, state, j, row):
                del state, j
                gi = group_of_row[row]
                return quant_row(w, scale[gi], None if zero is None else zero[gi], config.bits)

        q, states = _factor.sweep(
            w_pad, u_pad, block=block, sub=sub, start_fn=start_fn, row_fn=row_fn
        )
        q = q[:rows]
        if act_order:
            q = jnp.zeros((rows, n), jnp.float32).at[perm].set(q)
        if dynamic:
            scale = states[0][:groups]
            zero = states[1][:groups] if len(states) > 1 else None
        return grid_values(q, scale, zero, config.bits), scale, zero, ok


def gptq(
    kernel: ArrayLike,
    hessian: ArrayLike,
    *,
    bits: int = 4,
    group_size: int | None = None,
    act_order: bool = False,
    symmetric: bool = True,
    damp: float = 0.01,
    calibration: str = "absmax",
    block_size: int = BLOCK,
    name: str = "kernel",
) -> QArray:
    """Quantizes a Flax kernel ``[in, out]`` with GPTQ, given the Hessian of its inputs.

    GPTQ minimises the layer's output error :math:`\\|X W - X \\hat W\\|^2` one
    input feature (row of the Flax kernel) at a time, spreading each row's
    rounding error over the rows not yet quantized with the upper Cholesky
    factor ``U`` of the damped inverse Hessian:

    .. math::

        H = 2 X^T X + \\lambda I, \\quad U^T U = H^{-1}, \\quad
        e_i = \\frac{w_i - \\mathrm{rtn}(w_i)}{U_{ii}}, \\quad
        w_j \\leftarrow w_j - U_{ij} e_i \\;(j > i)

    with :math:`\\lambda` = ``damp`` times the mean of ``diag(H)``. Rows run in
    blocks of ``block_size`` with lazy batch updates, inside one ``jit``
    (``lax.fori_loop``) at the highest matmul precision.

    The grid is the quant core's (:func:`jaxcomp.quant.quantize`): symmetric
    ``s = absmax / (2^(b-1) - 1)`` or affine with a zero point, per output
    column or per ``group_size`` consecutive input rows. Without ``act_order``,
    a group's scales are chosen when its first row is reached, from the rows
    already updated by the error feedback (as in the reference code). With
    ``act_order`` (rows visited by decreasing ``diag(H)``) the scales are
    computed up front from the original kernel in its original order ("static
    groups"), so the result has the standard QArray layout with no group index.

    Dead inputs (``H_ii = 0``) are zeroed. If the Cholesky factor has NaNs the
    damping is multiplied by 10 up to 4 times; if it still fails, the kernel is
    quantized by round-to-nearest (under ``jit`` too), with a ``UserWarning``
    naming ``name`` when called eagerly.

    Args:
      kernel: float kernel ``[..., out]`` (contraction axes are flattened, as in
        the QArray matrix view).
      hessian: ``[K, K]`` with ``K`` the flattened contraction size, ``2 X^T X``
        (any positive scaling; float32 is used).
      bits: code width, 2 to 8.
      group_size: input rows per scale, or ``None`` per output column; must divide ``K``.
      act_order: visit input features by decreasing Hessian diagonal.
      symmetric: zero point 0, or affine.
      damp: relative damping (0.01 = 1% of the mean diagonal).
      calibration: ``"absmax"``/``"minmax"`` or ``"mse"`` clipping of the scales.
      block_size: rows per lazy-update block (rounded to a multiple of ``group_size``).
      name: layer name for messages.

    Returns:
      A :class:`jaxcomp.quant.QArray` (``channel_axis`` = last axis).

    Raises:
      ValueError/TypeError: bad shapes, dtypes, ``group_size`` not dividing ``K``,
        or NaN/Inf in the kernel or Hessian.

    References:
      Frantar et al., GPTQ: Accurate Post-Training Quantization for Generative
      Pre-trained Transformers, 2022.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (256, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> q = gptq(w, 2 * x.T @ x, bits=4)
      >>> q.shape, q.bits, q.scale.shape
      ((16, 8), 4, (1, 8))
    """
    w2d, hessian = _factor.check_layer(kernel, hessian, name)
    kernel = jnp.asarray(kernel)
    config = QuantConfig(bits, -1, group_size, symmetric, calibration)
    if config.group_size is not None and w2d.shape[0] % config.group_size:
        raise ValueError(
            f"{name}: group_size {group_size} does not divide the {w2d.shape[0]} input rows of "
            f"kernel shape {kernel.shape}; use a divisor of it or None"
        )
    if calibration not in ("absmax", "minmax", "mse"):
        raise ValueError(f"{name}: calibration is {calibration!r}; expected absmax, minmax or mse")
    if not isinstance(damp, int | float) or damp < 0:
        raise ValueError(f"{name}: damp is {damp!r}; expected a number >= 0")
    eager = not isinstance(w2d, jax.core.Tracer) and not isinstance(hessian, jax.core.Tracer)
    if eager and not (bool(jnp.all(jnp.isfinite(w2d))) and bool(jnp.all(jnp.isfinite(hessian)))):
        raise ValueError(f"{name}: NaN or Inf in the kernel or the Hessian")
    block = block_rows(config.group_size, block_size)
    core = functools.partial(
        gptq_core, w2d, hessian, config=config, act_order=bool(act_order), block=block
    )
    (values, scale, zero, ok), last_damp = _factor.with_retries(core, damp, eager)
    meta = dict(
        bits=bits, shape=kernel.shape, dtype=kernel.dtype.name, channel_axis=kernel.ndim - 1
    )
    if eager and not bool(ok):
        warnings.warn(
            f"{name}: the damped Hessian is not positive definite even at {last_damp:g} x the "
            "mean diagonal; falling back to round-to-nearest",
            UserWarning,
            stacklevel=2,
        )
    return QArray.from_grid(values, scale, zero, group_size=config.group_size, **meta)
