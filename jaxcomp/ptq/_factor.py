"""Damped inverse-Hessian factor shared by GPTQ and SparseGPT, and their blockwise sweep.

Both algorithms visit the input features (rows of a Flax kernel ``[in, out]``)
in order, replace row ``i`` by a compressed row ``q_i`` and spread the error
over the rows not yet visited with the upper Cholesky factor ``U`` of
:math:`H^{-1}` (``U^T U = H^{-1}``):

.. math::

    e_i = (w_i - q_i) / U_{ii}, \\qquad w_j \\leftarrow w_j - U_{ij} e_i \\quad (j > i)

Rows are processed in blocks: inside a block the update is applied row by row
(``lax.fori_loop``); the rows after the block receive the block's accumulated
errors in one matmul ("lazy batch updates").

References:
  Frantar et al., GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers, 2022.
  Frantar and Alistarh, SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot, 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
DAMP_RETRIES = 4  # damping is multiplied by 10 on every failed Cholesky, this many times
SUPER = 4  # super-blocks: the update across them skips the rows already done
MICRO = 16  # rows updated one by one before a lazy update of the rest of the block
BASE = 256  # below this size the Cholesky and triangular inverse call LAPACK directly


def _mm(a, b):
    return jnp.dot(a, b, precision=HIGHEST)


def upper_inverse_factor(a: jax.Array) -> jax.Array:
    """Upper triangular ``U`` with ``U^T U = a^{-1}``, by recursion on 2x2 blocks.

    With ``a = R R^T`` (``R`` upper triangular, a Cholesky factorisation taken
    from the last row up) and ``U = R^{-1}``:

    .. math::

        R_{22} R_{22}^T = A_{22}, \\quad R_{12} = A_{12} U_{22}^T, \\quad
        R_{11} R_{11}^T = A_{11} - R_{12} R_{12}^T, \\quad
        U = \\begin{pmatrix} U_{11} & -U_{11} R_{12} U_{22} \\\\ 0 & U_{22} \\end{pmatrix}

    Almost all the work is in matmuls (about two thirds of one ``n^3`` matmul);
    on the project's CPUs this ran several times faster than
    ``jnp.linalg.cholesky`` + ``solve_triangular`` at 4096. Blocks of at most
    :data:`BASE` rows use LAPACK on the reversed matrix. A failed factorisation
    gives NaNs (never raises).
    """
    n = a.shape[0]
    if n <= BASE:
        lower = jnp.linalg.cholesky(a[::-1, ::-1])
        eye = jnp.eye(n, dtype=a.dtype)
        return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]
    h = n - n // 2
    u22 = upper_inverse_factor(a[h:, h:])
    r12 = _mm(a[:h, h:], u22.T)
    u11 = upper_inverse_factor(a[:h, :h] - _mm(r12, r12.T))
    u12 = -_mm(u11, _mm(r12, u22))
    bottom = jnp.concatenate([jnp.zeros((n - h, h), a.dtype), u22], axis=1)
    return jnp.concatenate([jnp.concatenate([u11, u12], axis=1), bottom], axis=0)


def check_layer(kernel, hessian, name: str) -> tuple[jax.Array, jax.Array]:
    """Validates a kernel ``[..., out]`` and its Hessian ``[K, K]``; returns the ``[K, N]`` view."""
    kernel = jnp.asarray(kernel)
    hessian = jnp.asarray(hessian)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"{name}: kernel dtype is {kernel.dtype}; expected a floating dtype")
    if kernel.ndim < 2:
        raise ValueError(
            f"{name}: kernel shape is {kernel.shape}; expected rank >= 2 with the output axis last"
        )
    rows = 1
    for d in kernel.shape[:-1]:
        rows *= d
    if hessian.shape != (rows, rows):
        raise ValueError(
            f"{name}: hessian shape is {hessian.shape}; expected ({rows}, {rows}) for a kernel "
            f"of shape {kernel.shape} (contraction axes flattened)"
        )
    return kernel.reshape(rows, kernel.shape[-1]).astype(jnp.float32), hessian


def with_retries(core: Callable[..., tuple], damp: float, eager: bool) -> tuple[tuple, float]:
    """Runs ``core(damp, retry=...)``, whose last output is the Cholesky success flag.

    Eagerly, a failed factorisation is retried from Python with 10x the damping
    (at least 0.01), :data:`DAMP_RETRIES` times; the fast path has no loop in
    the graph (an in-graph ``while_loop``/``cond`` around the factor cost ~2
    matmuls at 4096 on CPU). Under tracing, the retries happen inside the graph.
    Returns the outputs and the damping of the last try.
    """
    if not eager:
        return core(jnp.float32(damp), retry=True), damp
    d = damp
    for attempt in range(DAMP_RETRIES + 1):
        if attempt:
            d = max(d * 10.0, 0.01)
        out = core(jnp.float32(d), retry=False)
        if bool(out[-1]):
            break
    return out, d


def inverse_factor(hessian: jax.Array, kernel2d: jax.Array, damp: float, retry: bool = True):
    """Upper Cholesky factor of the damped :math:`H^{-1}`, with dead inputs handled.

    Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and their kernel rows are zeroed.
    The damping ``damp * mean(diag H)`` is added to the diagonal; if the Cholesky
    factor has NaNs the damping is multiplied by 10, up to :data:`DAMP_RETRIES`
    times inside the graph when ``retry`` is true (:func:`with_retries` does the
    eager retries from Python instead).

    Returns:
      ``(U, kernel2d, ok)``: ``ok`` is a bool scalar, ``False`` when every try
      failed; ``U`` is then the identity, which turns the sweep into plain
      round-to-nearest (GPTQ) or blockwise magnitude pruning (SparseGPT).
    """
    h = hessian.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(jnp.float32))
    kernel2d = jnp.where(dead[:, None], 0.0, kernel2d)
    mean_diag = jnp.mean(jnp.diagonal(h))
    eye = jnp.eye(h.shape[0], dtype=jnp.float32)

    def factor(d):
        u = upper_inverse_factor(h + d * mean_diag * eye)
        return u, jnp.all(jnp.isfinite(u))

    def cond(carry):
        _, ok, tries, _ = carry
        return (~ok) & (tries < DAMP_RETRIES)

    def body(carry):
        _, _, tries, d = carry
        d = jnp.maximum(d * 10.0, 0.01)
        u, ok = factor(d)
        return u, ok, tries + 1, d

    def retry_loop(u, ok, d0):
        u, ok, _, _ = jax.lax.while_loop(cond, body, (u, ok, jnp.int32(0), d0))
        return jnp.where(ok, u, eye), ok

    d0 = jnp.float32(damp)
    u, ok = factor(d0)
    if not retry:
        return jnp.where(ok, u, eye), kernel2d, ok
    # The common case (first try succeeds) skips the loop and its buffer copies.
    u, ok = jax.lax.cond(ok, lambda u, ok, d: (u, ok), retry_loop, u, ok, d0)
    return u, kernel2d, ok


def pad_rows(kernel2d: jax.Array, u: jax.Array, block: int):
    """Pads ``[K, N]`` rows with zeros and ``U`` with identity up to a multiple of ``block``."""
    rows = kernel2d.shape[0]
    extra = -rows % block
    if not extra:
        return kernel2d, u
    kernel2d = jnp.pad(kernel2d, ((0, extra), (0, 0)))
    u = jnp.pad(u, ((0, extra), (0, extra)))
    u = u + jnp.diag(jnp.concatenate([jnp.zeros(rows), jnp.ones(extra)]).astype(jnp.float32))
    return kernel2d, u


def sweep(
    w: jax.Array,
    u: jax.Array,
    *,
    block: int,
    sub: int,
    start_fn: Callable[[jax.Array, jax.Array, jax.Array], Any],
    row_fn: Callable[[jax.Array, Any, jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, Any]:
    """The blockwise error-feedback sweep over the rows of ``w [Kp, N]`` (``block | Kp``).

    Blocks are grouped into :data:`SUPER` super-blocks (a static loop): inside
    one, a block's errors update the rest of the super-block; after it, all
    later rows are updated in one matmul, which skips most of the zero lower
    triangle of ``U``. Each block is split into sub-groups of ``sub`` rows (``sub | block``).
    ``start_fn(rows [sub, N], u_diag [sub], first_row)`` runs on the current
    (error-updated) rows when a sub-group begins and returns a state (group
    scales, an N:M mask, ...); ``row_fn(w_row [N], state, j, row)`` returns the
    compressed row (``j`` the index inside the sub-group, ``row`` the global
    index). Returns the compressed rows ``[Kp, N]`` and the states of all
    sub-groups stacked along a leading axis of size ``Kp // sub``.
    """
    kp, n = w.shape
    per_block = block // sub
    micro = math.gcd(sub, MICRO)
    shapes = jax.eval_shape(start_fn, w[:sub], jnp.diagonal(u)[:sub], jnp.int32(0))
    states = jax.tree.map(lambda a: jnp.zeros((kp // sub, *a.shape), a.dtype), shapes)
    blocks = kp // block
    span = block * -(-blocks // SUPER)  # rows per super-block
    outs = []
    w_rest = w
    for c0 in range(0, kp, span):
        c1 = min(c0 + span, kp)
        us = u[c0:c1, c0:c1]
        col = jnp.arange(c1 - c0)

        def block_body(b, carry, c0=c0, us=us, col=col):
            ws, out_s, e_s, states = carry
            r0 = b * block  # local to the super-block
            w1 = jax.lax.dynamic_slice(ws, (r0, 0), (block, n))
            u_rows = jax.lax.dynamic_slice(us, (r0, 0), (block, us.shape[1]))
            u1 = jax.lax.dynamic_slice(u_rows, (0, r0), (block, block))
            d1 = jnp.diagonal(u1)
            g0 = c0 + r0  # global index of the block's first row

            def sub_body(s, c):
                w1, q1, e1, states = c
                s0 = s * sub
                state = start_fn(
                    jax.lax.dynamic_slice(w1, (s0, 0), (sub, n)),
                    jax.lax.dynamic_slice(d1, (s0,), (sub,)),
                    g0 + s0,
                )
                index = (c0 // block + b) * per_block + s
                states = jax.tree.map(lambda buf, x: buf.at[index].set(x), states, state)

                def micro_body(m, c2):
                    w1, q1, e1 = c2
                    m0 = s0 + m * micro
                    wm = jax.lax.dynamic_slice(w1, (m0, 0), (micro, n))
                    um = jax.lax.dynamic_slice(u1, (m0, m0), (micro, micro))

                    def row_step(j, c3):
                        wm, qm, em = c3
                        row = wm[j]
                        q = row_fn(row, state, m * micro + j, g0 + m0 + j)
                        err = (row - q) / um[j, j]
                        wm = wm - um[j][:, None] * err[None, :]
                        return wm, qm.at[j].set(q), em.at[j].set(err)

                    zm = jnp.zeros((micro, n), jnp.float32)
                    _, qm, em = jax.lax.fori_loop(0, micro, row_step, (wm, zm, zm))
                    # Lazy update of the rest of the block from this micro-block's errors.
                    um_rows = jax.lax.dynamic_slice(u1, (m0, 0), (micro, block))
                    um_rows = jnp.where(jnp.arange(block)[None, :] >= m0 + micro, um_rows, 0.0)
                    w1 = w1 - jnp.dot(um_rows.T, em, precision=HIGHEST)
                    q1 = jax.lax.dynamic_update_slice(q1, qm, (m0, 0))
                    e1 = jax.lax.dynamic_update_slice(e1, em, (m0, 0))
                    return w1, q1, e1

                w1, q1, e1 = jax.lax.fori_loop(0, sub // micro, micro_body, (w1, q1, e1))
                return w1, q1, e1, states

            zeros = jnp.zeros((block, n), jnp.float32)
            _, q1, e1, states = jax.lax.fori_loop(
                0, per_block, sub_body, (w1, zeros, zeros, states)
            )
            # Lazy update of the rest of the super-block from this block's errors.
            later = jnp.where(col[None, :] >= r0 + block, u_rows, 0.0)
            ws = ws - jnp.dot(later.T, e1, precision=HIGHEST)
            out_s = jax.lax.dynamic_update_slice(out_s, q1, (r0, 0))
            e_s = jax.lax.dynamic_update_slice(e_s, e1, (r0, 0))
            return ws, out_s, e_s, states

        ws = w_rest[: c1 - c0]
        zs = jnp.zeros_like(ws)
        _, out_s, e_s, states = jax.lax.fori_loop(
            0, (c1 - c0) // block, block_body, (ws, zs, zs, states)
        )
        outs.append(out_s)
        # The rows after the super-block receive its errors in one (triangular-saving) matmul.
        w_rest = w_rest[c1 - c0 :] - jnp.dot(u[c0:c1, c1:].T, e_s, precision=HIGHEST)
    return jnp.concatenate(outs, axis=0), states
