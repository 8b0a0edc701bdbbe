"""Float64 numpy references of GPTQ and SparseGPT (column by column, no lazy blocks)."""

from __future__ import annotations

import numpy as np


def correlated_inputs(rng, tokens: int, features: int) -> np.ndarray:
    """Inputs whose features are strongly correlated (a random mixing plus a little noise)."""
    mix = rng.normal(size=(features, features)) / np.sqrt(features)
    scale = np.exp(rng.normal(size=features))  # uneven feature magnitudes
    return (
        rng.normal(size=(tokens, features)) @ mix + 0.05 * rng.normal(size=(tokens, features))
    ) * scale


def grid_params(x: np.ndarray, bits: int, symmetric: bool):
    """Scale and zero point ``[N]`` of values ``[g, N]`` (the quant core's absmax rules)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        s = np.abs(x).max(axis=0) / qmax
        return np.where(s > 0, s, 1.0), None
    lo = np.minimum(x.min(axis=0), 0.0)
    hi = np.maximum(x.max(axis=0), 0.0)
    s = (hi - lo) / (qmax - qmin)
    s = np.where(s > 0, s, 1.0)
    return s, np.clip(qmin - np.round(lo / s), qmin, qmax)


def quant(w, s, z, bits):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if z is None:
        return np.clip(np.round(w / s), qmin, qmax) * s
    return (np.clip(np.round(w / s) + z, qmin, qmax) - z) * s


def _prepare(w, h, damp, perm=None):
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    if perm is not None:
        h = h[perm][:, perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    return w, u


def gptq(w, h, *, bits, group_size=None, act_order=False, symmetric=True, damp=0.01):
    """Returns ``(grid values [K, N], dequantized kernel)`` in the original row order."""
    rows, n = w.shape
    perm = np.argsort(-np.diag(np.asarray(h, np.float64)), kind="stable") if act_order else None
    w, u = _prepare(w, h, damp, perm)
    g = group_size or rows
    groups = rows // g
    if not act_order and group_size:
        params = [None] * groups  # filled when each group starts
    else:
        params = [grid_params(w[k * g : (k + 1) * g], bits, symmetric) for k in range(groups)]
    order = perm if perm is not None else np.arange(rows)
    wp = w[order].copy()
    q = np.zeros_like(wp)
    for i in range(rows):
        if params[0] is None or (not act_order and group_size and i % g == 0):
            params[i // g] = grid_params(wp[i : i + g], bits, symmetric)
        s, z = params[order[i] // g]
        q[i] = quant(wp[i], s, z, bits)
        err = (wp[i] - q[i]) / u[i, i]
        wp[i:] -= np.outer(u[i, i:], err)
    out = np.zeros_like(q)
    out[order] = q
    values = np.zeros_like(out)
    for k in range(groups):
        s, z = params[k]
        v = np.round(out[k * g : (k + 1) * g] / s)
        values[k * g : (k + 1) * g] = v if z is None else v + z
    return values, out


def sparsegpt(w, h, *, sparsity=0.5, nm=None, bits=None, symmetric=True, block=128, damp=0.01):
    """Returns ``(kernel, kept mask)``; masks chosen per block (unstructured) or per M rows."""
    w, u = _prepare(w, h, damp)
    rows, n = w.shape
    if bits is not None:
        s, z = grid_params(w, bits, symmetric)
    pruned = np.zeros(w.shape, bool)
    q = np.zeros_like(w)
    d = np.diag(u)
    for b0 in range(0, rows, block):
        b1 = min(b0 + block, rows)
        if nm is None:
            score = w[b0:b1] ** 2 / d[b0:b1, None] ** 2
            count = round(sparsity * (b1 - b0) * n)
            order = np.argsort(score.ravel(), kind="stable")
            blk = np.zeros(score.size, bool)
            blk[order[:count]] = True
            pruned[b0:b1] = blk.reshape(score.shape)
        for i in range(b0, b1):
            if nm is not None and (i - b0) % nm[1] == 0:
                score = w[i : i + nm[1]] ** 2 / d[i : i + nm[1], None] ** 2
                ranks = np.argsort(np.argsort(score, axis=0, kind="stable"), axis=0, kind="stable")
                pruned[i : i + nm[1]] = ranks < nm[1] - nm[0]
            qi = np.where(pruned[i], 0.0, w[i])
            if bits is not None:
                qi = np.where(pruned[i], 0.0, quant(qi, s, z, bits))
            q[i] = qi
            err = (w[i] - qi) / u[i, i]
            w[i:] -= np.outer(u[i, i:], err)
    return q, ~pruned
