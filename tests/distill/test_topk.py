"""Top-k teacher KL (renormalised and tail bucket) against float64 numpy references.

Float32 math over at most 17 terms of O(10) logs: ``rtol=1e-5, atol=5e-6``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxcomp import distill

RTOL, ATOL = 1e-5, 5e-6


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(log_a, log_b):
    return (np.exp(log_a) * (log_a - log_b)).sum(-1)


def _ref_topk_kl(zs, zt, indices, temperature, mode):
    log_p = np.take_along_axis(_log_softmax(np.asarray(zt, np.float64) / temperature), indices, -1)
    log_q_full = _log_softmax(np.asarray(zs, np.float64) / temperature)
    log_q = np.take_along_axis(log_q_full, indices, -1)
    if mode == "renormalize":
        return _kl(_log_softmax(log_p), _log_softmax(log_q))
    tail_p = np.log1p(-np.exp(log_p).sum(-1, keepdims=True))
    tail_q = np.log1p(-np.exp(log_q).sum(-1, keepdims=True))
    return _kl(np.concatenate([log_p, tail_p], -1), np.concatenate([log_q, tail_q], -1))


def _inputs(rng, shape=(3, 4, 16)):
    zs = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    zt = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    return zs, zt


def test_teacher_topk(rng):
    _, zt = _inputs(rng)
    log_probs, indices = distill.teacher_topk(zt, 5, temperature=2.0)
    expected_idx = np.argsort(-zt, axis=-1)[..., :5]
    np.testing.assert_array_equal(indices, expected_idx)
    assert indices.dtype == jnp.int32 and log_probs.dtype == jnp.float32
    expected = np.take_along_axis(_log_softmax(zt / 2.0), expected_idx, -1)
    np.testing.assert_allclose(log_probs, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["renormalize", "tail"])
@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (6, 2.5), (15, 0.8)])
def test_matches_reference(rng, mode, k, temperature):
    zs, zt = _inputs(rng)
    mask = rng.random((3, 4)) < 0.6
    log_p, indices = distill.teacher_topk(zt, k, temperature=temperature)
    expected = _ref_topk_kl(zs, zt, np.asarray(indices), temperature, mode)
    got = distill.topk_kl(zs, log_p, indices, mode=mode, temperature=temperature, reduction="none")
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # the order of the k entries does not matter
    perm = rng.permutation(k)
    got = distill.topk_kl(
        zs, log_p[..., perm], indices[..., perm], mode=mode, temperature=temperature, where=mask
    )
    np.testing.assert_allclose(got, expected[mask].mean(), rtol=RTOL, atol=ATOL)


def test_full_vocabulary_equals_kl_and_truncations_are_bounded(rng):
    zs, zt = _inputs(rng)
    full = np.asarray(distill.kl_div(zs, zt, temperature=2.0, reduction="none"))
    log_p, indices = distill.teacher_topk(zt, 16, temperature=2.0)
    for mode in ("renormalize", "tail"):
        got = distill.topk_kl(zs, log_p, indices, mode=mode, temperature=2.0, reduction="none")
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    for k in (2, 6, 12):
        log_p, indices = distill.teacher_topk(zt, k, temperature=2.0)
        tail = distill.topk_kl(zs, log_p, indices, mode="tail", temperature=2.0, reduction="none")
        renorm = distill.topk_kl(zs, log_p, indices, temperature=2.0, reduction="none")
        mass = np.exp(np.asarray(log_p, np.float64)).sum(-1)
        assert (np.asarray(tail) <= full + 1e-6).all()
        assert (mass * np.asarray(renorm) <= np.asarray(tail) + 1e-6).all()


@pytest.mark.parametrize("mode", ["renormalize", "tail"])
def test_gradients_masks_and_jit(rng, mode):
    zs, zt = _inputs(rng, (2, 3, 8))
    log_p, indices = distill.teacher_topk(zt, 3)
    check_grads(
        jax.jit(lambda s: distill.topk_kl(s, log_p, indices, mode=mode, temperature=1.5)),
        (zs,),
        order=1,
        modes=["rev"],
    )
    # masked positions may hold garbage indices and log-probs
    mask = np.array([[True, False, True], [False, True, True]])
    bad_idx = np.where(mask[..., None], indices, -1).astype(np.int32)
    bad_lp = np.where(mask[..., None], log_p, np.nan).astype(np.float32)
    traces = []

    @jax.jit
    def loss(zs, log_p, idx, temperature):
        traces.append(1)
        return distill.topk_kl(zs, log_p, idx, mode=mode, temperature=temperature, where=mask)

    for temperature in (1.0, 3.0):
        log_p_t, idx_t = distill.teacher_topk(zt, 3, temperature=temperature)
        got = loss(
            zs, np.where(mask[..., None], log_p_t, np.nan), bad_idx, jnp.float32(temperature)
        )
        expected = _ref_topk_kl(zs, zt, np.asarray(idx_t), temperature, mode)[mask].mean()
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert len(traces) == 1
    grad = jax.jit(jax.grad(loss))(zs, bad_lp, bad_idx, jnp.float32(1.0))
    assert np.isfinite(grad).all() and (np.asarray(grad)[~mask] == 0).all()
    # -inf student logits outside the top-k keep the tail finite
    zs_inf = zs.copy()
    zs_inf[..., 7] = -np.inf
    grad = jax.jit(jax.grad(lambda s: distill.topk_kl(s, log_p, indices, mode=mode)))(zs_inf)
    assert np.isfinite(grad).all()


def test_top_k_covering_a_masked_vocabulary_is_the_full_kl(rng):
    """Both models ban entries 5..7; k = 6 keeps every allowed entry (and one banned)."""
    zs, zt = _inputs(rng, (3, 8))
    zs[:, 5:] = zt[:, 5:] = -np.inf
    log_p, indices = distill.teacher_topk(zt, 6)
    full = distill.kl_div(zs, zt, reduction="none")
    for mode in ("renormalize", "tail"):
        loss = jax.jit(lambda s, m=mode: distill.topk_kl(s, log_p, indices, mode=m))
        np.testing.assert_allclose(
            distill.topk_kl(zs, log_p, indices, mode=mode, reduction="none"), full, rtol=RTOL
        )
        assert np.isfinite(jax.grad(loss)(zs)).all()


def test_bad_inputs(rng):
    zs, zt = _inputs(rng, (2, 6))
    log_p, indices = distill.teacher_topk(zt, 3)
    with pytest.raises(ValueError, match="k must be an integer in \\[1, 6\\]"):
        distill.teacher_topk(zt, 7)
    with pytest.raises(ValueError, match="mode must be one of"):
        distill.topk_kl(zs, log_p, indices, mode="bucket")
    with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, 6\)"):
        distill.topk_kl(zs, log_p, np.full((2, 3), 6, np.int32))
    # padding indices at masked positions are fine, at unmasked ones they are not
    padded = np.array(indices).copy()
    padded[1] = -1
    distill.topk_kl(zs, log_p, padded, where=np.array([True, False]))
    with pytest.raises(ValueError, match=r"unmasked positions; got values in \[-1, "):
        distill.topk_kl(zs, log_p, padded)
    with pytest.raises(TypeError, match="teacher_indices must have an integer dtype"):
        distill.topk_kl(zs, log_p, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"must both be \[..., k\]"):
        distill.topk_kl(zs, log_p, indices[:, :2])
    with pytest.raises(ValueError, match=r"must both be \[..., k\]"):
        distill.topk_kl(zs[:1], log_p, indices)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        distill.topk_kl(zs, log_p, indices, temperature=0.0)
