"""Decoupled KD against a float64 numpy port of the authors' formulation.

Tolerances as in test_logit_losses.py (float32 math, O(1) values, V <= 10):
``rtol=1e-5, atol=5e-6``, scaled by ``T^2`` through the relative part.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxcomp import distill

RTOL, ATOL = 1e-5, 5e-6


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _ref_dkd(zs, zt, labels, alpha, beta, temperature):
    """Per-row DKD as in the reference code: binary masses and a -1000 target shift."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    gt = np.eye(zs.shape[-1])[labels].astype(bool)
    ps, pt = _softmax(zs / temperature), _softmax(zt / temperature)
    bs = np.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
    bt = np.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum(-1)
    qs2, qt2 = _softmax(zs / temperature - 1000.0 * gt), _softmax(zt / temperature - 1000.0 * gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        nckd = np.where(qt2 > 0, qt2 * (np.log(qt2) - np.log(qs2)), 0.0).sum(-1)
    return temperature**2 * (alpha * tckd + beta * nckd)


def _inputs(rng, shape=(4, 5, 10)):
    zs = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    zt = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    return zs, zt, labels


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"),
    [(1.0, 8.0, 4.0), (1.0, 1.0, 1.0), (0.5, 2.0, 0.7), (0.0, 0.0, 2.0)],
)
def test_matches_reference(rng, alpha, beta, temperature):
    zs, zt, labels = _inputs(rng)
    mask = rng.random(labels.shape) < 0.6
    padded = np.where(mask, labels, -100).astype(np.int32)
    expected = _ref_dkd(zs, zt, labels, alpha, beta, temperature)
    per_position = distill.dkd_loss(
        zs, zt, labels, alpha=alpha, beta=beta, temperature=temperature, reduction="none"
    )
    np.testing.assert_allclose(per_position, expected, rtol=RTOL, atol=ATOL)
    got = distill.dkd_loss(
        zs, zt, padded, alpha=alpha, beta=beta, temperature=temperature, where=mask
    )
    np.testing.assert_allclose(got, expected[mask].mean(), rtol=RTOL, atol=ATOL)


def test_classic_kd_decomposes_into_tckd_and_weighted_nckd(rng):
    """T^2 KL(p || q) = T^2 TCKD + (1 - p_y) T^2 NCKD, the identity DKD starts from."""
    zs, zt, labels = _inputs(rng)
    temperature = 3.0
    p_target = np.take_along_axis(_softmax(zt / temperature), labels[..., None], -1)[..., 0]
    soft = distill.hinton_loss(zs, zt, labels, temperature=temperature, alpha=1.0, reduction="none")
    tckd = distill.dkd_loss(
        zs, zt, labels, alpha=1.0, beta=0.0, temperature=temperature, reduction="none"
    )
    nckd = distill.dkd_loss(
        zs, zt, labels, alpha=0.0, beta=1.0, temperature=temperature, reduction="none"
    )
    np.testing.assert_allclose(soft, tckd + (1 - p_target) * nckd, rtol=1e-5, atol=1e-5)


def test_gradients_jit_and_traced_weights(rng):
    zs, zt, labels = _inputs(rng, (3, 6))
    check_grads(
        jax.jit(lambda s: distill.dkd_loss(s, zt, labels, temperature=2.0)),
        (zs,),
        order=1,
        modes=["rev"],
    )
    traces = []

    @jax.jit
    def loss(zs, alpha, beta, temperature):
        traces.append(1)
        return distill.dkd_loss(zs, zt, labels, alpha=alpha, beta=beta, temperature=temperature)

    for alpha, beta, temperature in [(1.0, 8.0, 4.0), (0.3, 2.0, 1.5)]:
        got = loss(zs, jnp.float32(alpha), jnp.float32(beta), jnp.float32(temperature))
        expected = _ref_dkd(zs, zt, labels, alpha, beta, temperature).mean()
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert len(traces) == 1
    teacher_grad = jax.grad(lambda t: distill.dkd_loss(zs, t, labels))(zt)
    assert (np.asarray(teacher_grad) == 0).all()


def test_neg_inf_entries_masks_and_nan_labels(rng):
    zs, zt, labels = _inputs(rng, (3, 6))
    labels = np.array([0, 1, 3], np.int32)
    zs[:, 5] = zt[:, 5] = -np.inf
    grad = jax.jit(jax.grad(lambda s: distill.dkd_loss(s, zt, labels)))(zs)
    assert np.isfinite(grad).all() and (np.asarray(grad)[:, 5] == 0).all()
    none = np.zeros(3, bool)
    assert float(distill.dkd_loss(zs * np.nan, zt, labels, where=none)) == 0.0
    # traced labels cannot be range-checked: out of range gives nan, never a silent value
    traced = jax.jit(lambda y: distill.dkd_loss(zs, zt, y, reduction="none"))
    assert np.isnan(np.asarray(traced(np.array([0, 9, 1], np.int32)))[1])
    # and so do traced negative weights
    weighted = jax.jit(lambda w: distill.dkd_loss(zs, zt, labels, beta=w))
    assert np.isfinite(weighted(jnp.float32(2.0))) and np.isnan(weighted(jnp.float32(-1.0)))


def test_bad_inputs(rng):
    zs, zt, labels = _inputs(rng, (2, 4))
    with pytest.raises(ValueError, match="beta must be finite and >= 0; got -1.0"):
        distill.dkd_loss(zs, zt, labels, beta=-1.0)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        distill.dkd_loss(zs, zt, labels, alpha=float("inf"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        distill.dkd_loss(zs, zt, np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match="at least 2 classes"):
        distill.dkd_loss(zs[:, :1], zt[:, :1], labels * 0)
    with pytest.raises(ValueError, match="student_logits has 4 classes and teacher_logits has 3"):
        distill.dkd_loss(zs, zt[:, :3], labels)
