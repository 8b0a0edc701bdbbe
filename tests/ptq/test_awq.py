"""AWQ per layer: against a float64 numpy reference, and better than round-to-nearest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import ptq, quant
from jaxcomp.ptq._awq import CLIP_RATIOS, awq_scales
from tests.ptq._reference import correlated_inputs


def _ref_fake_quant(w, bits, symmetric, ratio=1.0):
    """Round-to-nearest of ``[g, N]`` with ranges times ``ratio`` (float64)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        s = np.abs(w).max(axis=0) * ratio / qmax
        s = np.where(s > 0, s, 1.0)
        return np.clip(np.round(w / s), qmin, qmax) * s
    lo = np.minimum(w.min(axis=0), 0.0) * ratio
    hi = np.maximum(w.max(axis=0), 0.0) * ratio
    s = (hi - lo) / (qmax - qmin)
    s = np.where(s > 0, s, 1.0)
    z = np.clip(qmin - np.round(lo / s), qmin, qmax)
    return (np.clip(np.round(w / s) + z, qmin, qmax) - z) * s


def _ref_grouped(w, bits, group, symmetric, ratio=1.0):
    g = group or len(w)
    return np.concatenate(
        [_ref_fake_quant(w[i : i + g], bits, symmetric, ratio) for i in range(0, len(w), g)]
    )


def _ref_losses(w, h, a, bits, group, symmetric, grid):
    a = np.maximum(a, 1e-4)
    losses, scales = [], []
    for i in range(grid):
        s = a ** (i / grid)
        s = s / np.sqrt(s.max() * s.min())
        e = w - _ref_grouped(w * s[:, None], bits, group, symmetric) / s[:, None]
        losses.append(np.sum(e * (h @ e)))
        scales.append(s)
    return np.array(losses), np.array(scales)


def _ref_clip_errors(ws, h, bits, group, symmetric):
    """Error ``e_g^T H_gg e_g`` of every clipping ratio: ``[ratios, G, N]``."""
    g = group or len(ws)
    out = []
    for r in CLIP_RATIOS:
        e = ws - _ref_grouped(ws, bits, group, symmetric, r)
        errs = [
            np.einsum("in,ij,jn->n", e[k : k + g], h[k : k + g, k : k + g], e[k : k + g])
            for k in range(0, len(ws), g)
        ]
        out.append(errs)
    return np.array(out)


def _layer(rng, tokens=512, k=64, n=24):
    x = correlated_inputs(rng, tokens, k)
    w = rng.normal(size=(k, n))
    return x, w, 2 * x.T @ x / tokens, np.abs(x).mean(0)


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(3, None, True), (4, 16, False)])
def test_awq_matches_numpy_reference(rng, bits, group, symmetric):
    x, w, h, a = _layer(rng)
    ref_losses, ref_scales = _ref_losses(w, h, a, bits, group, symmetric, grid=20)
    config = quant.QuantConfig(bits=bits, group_size=group, symmetric=symmetric)
    s, losses = awq_scales(
        jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), jnp.asarray(a), config=config
    )
    # float32 quantization (a rare round-half flip moves a loss by ~1e-4 relative)
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-4)
    best = int(np.argmin(ref_losses))
    margin = np.sort(ref_losses)[1] / ref_losses[best] - 1
    assert margin > 2e-3, "the test layer must have a clear best alpha"
    np.testing.assert_allclose(s, ref_scales[best], rtol=1e-5)

    s, q = ptq.awq(
        w.astype(np.float32),
        h.astype(np.float32),
        a,
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )
    s64 = np.asarray(s, np.float64)
    ws, hs = w * s64[:, None], h / np.outer(s64, s64)
    errs = _ref_clip_errors(ws, hs, bits, group, symmetric)
    g = group or len(w)
    e = ws - np.asarray(q.dequantize(), np.float64)
    ours = np.array(
        [
            np.einsum("in,ij,jn->n", e[k : k + g], hs[k : k + g, k : k + g], e[k : k + g])
            for k in range(0, len(w), g)
        ]
    )
    np.testing.assert_allclose(ours, errs.min(axis=0), rtol=1e-3, atol=1e-9)
    # where the best ratio is clear, the grid values are exactly the reference's
    order = np.sort(errs, axis=0)
    clear = order[1] > order[0] * 1.01
    ref_best = np.argmin(errs, axis=0)
    ref_dq = np.stack(
        [_ref_grouped(ws, bits, group, symmetric, r) for r in CLIP_RATIOS]
    )  # [ratios, K, N]
    pick = np.repeat(ref_best, g, axis=0)
    ref_q = np.take_along_axis(ref_dq, pick[None], axis=0)[0]
    rows_clear = np.repeat(clear, g, axis=0)
    assert rows_clear.mean() > 0.5
    np.testing.assert_allclose(
        np.asarray(q.dequantize())[rows_clear], ref_q[rows_clear], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_output_error_below_round_to_nearest(rng, bits):
    x, w, h, a = _layer(rng, tokens=1024, k=128, n=64)
    s, q = ptq.awq(w.astype(np.float32), h.astype(np.float32), a, bits=bits, group_size=32)
    y = x @ w
    awq_err = np.linalg.norm(y - (x / np.asarray(s)) @ np.asarray(q.dequantize(), np.float64))
    rtn = quant.quantize(w.astype(np.float32), bits, group_size=32).dequantize()
    rtn_err = np.linalg.norm(y - x @ np.asarray(rtn, np.float64))
    assert awq_err < 0.85 * rtn_err, (awq_err, rtn_err)


def test_awq_under_jit_and_alpha_zero_is_rtn(rng):
    x, w, h, a = _layer(rng)
    config = quant.QuantConfig(bits=4)
    s, _ = jax.jit(lambda w, h, a: awq_scales(w, h, a, config=config, grid=1))(w, h, a)
    np.testing.assert_array_equal(s, np.ones(len(w), np.float32))  # grid=1 tries alpha 0 only
    s, q = ptq.awq(w.astype(np.float32), h, a, bits=4, grid=1, clip=False)
    np.testing.assert_array_equal(q.codes, quant.quantize(w.astype(np.float32), 4).codes)


def test_awq_bad_input(rng):
    _, w, h, a = _layer(rng, k=48)
    with pytest.raises(ValueError, match=r"layer0: group_size 32 does not divide the 48"):
        ptq.awq(w, h, a, group_size=32, name="layer0")
    with pytest.raises(ValueError, match=r"hessian has shape \(4, 4\)"):
        ptq.awq(w, np.eye(4), a)
    with pytest.raises(ValueError, match="grid is 0"):
        ptq.awq(w, h, a, grid=0)
    with pytest.raises(ValueError, match="bits is 9"):
        ptq.awq(w, h, a, bits=9)
