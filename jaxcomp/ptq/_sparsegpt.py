"""SparseGPT: one-shot pruning of one kernel (unstructured or N:M) with error feedback."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.ptq import _factor
from jaxcomp.ptq._gptq import BLOCK, quant_row
from jaxcomp.quant import QuantConfig, _calibrate


def parse_pattern(pattern: str | None, name: str) -> tuple[int, int] | None:
    """``"N:M"`` as ``(N, M)`` with ``0 < N < M``, ``None`` for unstructured."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        n_str, m_str = str(pattern).split(":")
        keep, group = int(n_str), int(m_str)
    except ValueError:
        keep = group = -1
    if not 0 < keep < group:
        raise ValueError(f"{name}: pattern is {pattern!r}; expected 'unstructured' or 'N:M'")
    return keep, group


def _ranks(scores: jax.Array, axis: int | None) -> jax.Array:
    """Rank of every score (0 = lowest; ties: lower flat index ranks lower)."""
    flat = scores.reshape(-1) if axis is None else scores
    order = jnp.argsort(flat, axis=0 if axis is None else axis, stable=True)
    ranks = jnp.argsort(order, axis=0 if axis is None else axis, stable=True)
    return ranks.reshape(scores.shape)


@functools.partial(jax.jit, static_argnames=("counts", "nm", "config", "block", "retry"))
def sparsegpt_core(w2d, hessian, damp, *, counts, nm, config, block, retry=True):
    """Jitted SparseGPT on the ``[K, N]`` view; returns ``(kernel2d, pruned, ok)``."""
    with jax.default_matmul_precision("highest"):
        rows, n = w2d.shape
        hessian = hessian.astype(jnp.float32)
        u, w2d, ok = _factor.inverse_factor(hessian, w2d, damp, retry)
        w_pad, u_pad = _factor.pad_rows(w2d, u, block)
        if config is not None:
            groups = rows // config.group_size if config.group_size else 1
            scale, zero = _calibrate.grouped_params(w2d.reshape(groups, rows // groups, n), config)
        counts_arr = jnp.asarray(counts, jnp.int32)

        if nm is None:
            sub = block

            def start_fn(rows_, dsub, r0):
                score = jnp.square(rows_) / jnp.square(dsub)[:, None]
                real = (r0 + jnp.arange(block)) < rows
                score = jnp.where(real[:, None], score, jnp.inf)
                return _ranks(score, None) < counts_arr[r0 // block]

        else:
            keep, sub = nm

            def start_fn(rows_, dsub, r0):
                del r0
                score = jnp.square(rows_) / jnp.square(dsub)[:, None]
                return _ranks(score, 0) < sub - keep

        def row_fn(w, pruned, j, row):
            q = jnp.where(pruned[j], 0.0, w)
            if config is not None:
                gi = jnp.minimum(row, rows - 1) // (rows // groups)
                q = quant_row(q, scale[gi], None if zero is None else zero[gi], config.bits)
                q = jnp.where(pruned[j], 0.0, q)
            return q

        q, pruned = _factor.sweep(
            w_pad, u_pad, block=block, sub=sub, start_fn=start_fn, row_fn=row_fn
        )
        return q[:rows], pruned.reshape(-1, n)[:rows], ok


def sparsegpt(
    kernel: ArrayLike,
    hessian: ArrayLike,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = BLOCK,
    name: str = "kernel",
) -> tuple[jax.Array, jax.Array]:
    """Prunes a Flax kernel ``[in, out]`` with SparseGPT, given the Hessian of its inputs.

    Rows (input features) are visited in order, in blocks of ``block_size``. For
    unstructured sparsity the mask of a block is chosen when the block begins
    (adaptive mask selection), from the weights already updated by the error
    feedback, by the OBS saliency

    .. math::

        \\varepsilon_{ij} = w_{ij}^2 / U_{ii}^2, \\qquad U^T U = (2 X^T X + \\lambda I)^{-1}

    pruning the ``round(sparsity * rows_in_block * out)`` lowest entries of the
    block (exact count per block; ties go to the lower flat index). With
    ``pattern="N:M"`` every group of ``M`` consecutive input rows keeps ``N``
    entries per output column, chosen when the group begins. Each row's error
    :math:`e_i = (w_i - q_i) / U_{ii}` is spread over the later rows
    (:math:`w_j \\leftarrow w_j - U_{ij} e_i`). With ``bits`` the kept weights are
    also quantized (jointly, inside the same sweep) on the symmetric or affine
    grid of :func:`jaxcomp.quant.quantize`, with per-column (or per-group)
    scales computed up front from the original kernel; pruned weights stay
    exactly 0. On a failed Cholesky (after raising the damping 10x four times)
    it falls back to blockwise magnitude pruning (round-to-nearest for
    ``bits``), with a warning naming ``name`` when called eagerly.

    Args:
      kernel: float kernel ``[..., out]`` (contraction axes flattened).
      hessian: ``[K, K]``, ``2 X^T X`` over the inputs (any positive scaling).
      sparsity: fraction pruned for ``"unstructured"`` (default 0.5); for ``"N:M"``
        ``None`` or exactly ``1 - N/M``.
      pattern: ``"unstructured"`` or ``"N:M"`` along the input axis (``M`` must divide ``K``).
      bits: ``None`` (no quantization) or 2 to 8 for joint quantization.
      group_size: scale groups for ``bits`` (must divide ``K``).
      symmetric: grid of the joint quantization.
      damp: relative damping of the Hessian diagonal.
      block_size: rows per block (rounded to a multiple of ``M``).
      name: layer name for messages.

    Returns:
      ``(kernel, mask)``: the pruned (and possibly quantized) kernel in the input
      shape and dtype, and a bool mask of the same shape (``True`` = kept).

    References:
      Frantar and Alistarh, SparseGPT: Massive Language Models Can Be Accurately
      Pruned in One-Shot, 2023.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (256, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> w_s, mask = sparsegpt(w, 2 * x.T @ x, pattern="2:4")
      >>> int(mask.sum()), bool(jnp.all(w_s[~mask] == 0))
      (64, True)
    """
    w2d, hessian = _factor.check_layer(kernel, hessian, name)
    kernel = jnp.asarray(kernel)
    rows, n = w2d.shape
    nm = parse_pattern(pattern, name)
    if nm is None:
        sparsity = 0.5 if sparsity is None else sparsity
        if not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"{name}: sparsity is {sparsity!r}; expected a number in [0, 1)")
        block = block_size
        counts = tuple(round(sparsity * min(block, rows - r0) * n) for r0 in range(0, rows, block))
    else:
        keep, group = nm
        if sparsity is not None and not math.isclose(sparsity, 1 - keep / group):
            raise ValueError(
                f"{name}: sparsity {sparsity} does not match pattern {pattern!r} "
                f"(which prunes {1 - keep / group:g}); pass sparsity=None"
            )
        if rows % group:
            raise ValueError(
                f"{name}: pattern {pattern!r} needs the {rows} input rows of kernel shape "
                f"{kernel.shape} to be a multiple of {group}"
            )
        block = group * max(1, block_size // group)
        counts = ()
    config = None
    if bits is not None:
        config = QuantConfig(bits, -1, group_size, symmetric)
        if group_size is not None and rows % group_size:
            raise ValueError(
                f"{name}: group_size {group_size} does not divide the {rows} input rows of "
                f"kernel shape {kernel.shape}"
            )
    eager = not isinstance(w2d, jax.core.Tracer) and not isinstance(hessian, jax.core.Tracer)
    if eager and not (bool(jnp.all(jnp.isfinite(w2d))) and bool(jnp.all(jnp.isfinite(hessian)))):
        raise ValueError(f"{name}: NaN or Inf in the kernel or the Hessian")
    core = functools.partial(
        sparsegpt_core, w2d, hessian, counts=counts, nm=nm, config=config, block=block
    )
    (q, pruned, ok), _ = _factor.with_retries(core, damp, eager)
    if eager and not bool(ok):
        warnings.warn(
            f"{name}: the damped Hessian is not positive definite; falling back to blockwise "
            "magnitude pruning",
            UserWarning,
            stacklevel=2,
        )
    return q.reshape(kernel.shape).astype(kernel.dtype), (~pruned).reshape(kernel.shape)
