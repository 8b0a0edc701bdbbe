"""Feature distillation losses against float64 numpy references.

Values are O(1) sums of at most 32 float32 products: ``rtol=1e-5, atol=1e-6``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jaxcomp import distill

RTOL, ATOL = 1e-5, 1e-6


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _ref_at(x):
    x = np.asarray(x, np.float64)
    q = (x**2).mean(-1).reshape(x.shape[0], -1)
    return q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def test_hint_mse_identity_matrix_and_callable(rng):
    s, t = _normal(rng, (3, 4, 6)), _normal(rng, (3, 4, 5))
    w, b = _normal(rng, (6, 5)), _normal(rng, (5,))
    mask = rng.random((3, 4)) < 0.6
    s64, t64, w64 = (np.asarray(a, np.float64) for a in (s, t, w))

    same = distill.hint_mse(s[..., :5], t, reduction="none")
    np.testing.assert_allclose(same, ((s64[..., :5] - t64) ** 2).mean(-1), rtol=RTOL, atol=ATOL)
    per_position = ((s64 @ w64 - t64) ** 2).mean(-1)
    got = distill.hint_mse(s, t, w, where=mask)
    np.testing.assert_allclose(got, per_position[mask].mean(), rtol=RTOL, atol=ATOL)
    got = distill.hint_mse(s, t, lambda x: x @ w + b, reduction="none")
    np.testing.assert_allclose(got, ((s64 @ w64 + b - t64) ** 2).mean(-1), rtol=RTOL, atol=ATOL)

    # the learned regressor gets the FitNets gradient 2 s^T (s W - t) / (N D_t)
    grad_w = jax.jit(jax.grad(lambda w: distill.hint_mse(s, t, w)))(w)
    flat_s, residual = s64.reshape(-1, 6), (s64 @ w64 - t64).reshape(-1, 5)
    np.testing.assert_allclose(grad_w, 2 * flat_s.T @ residual / residual.size, rtol=1e-4)
    check_grads(jax.jit(lambda s, w: distill.hint_mse(s, t, w)), (s, w), order=1, modes=["rev"])
    assert (np.asarray(jax.grad(lambda t: distill.hint_mse(s, t, w))(t)) == 0).all()


def test_cosine_embedding_loss(rng):
    s, t = _normal(rng, (2, 5, 8)), _normal(rng, (2, 5, 8))
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    cosine = (s64 * t64).sum(-1) / (np.linalg.norm(s64, axis=-1) * np.linalg.norm(t64, axis=-1))
    np.testing.assert_allclose(
        distill.cosine_embedding_loss(s, t, reduction="none"), 1 - cosine, rtol=RTOL, atol=ATOL
    )
    # scale invariant, 0 when aligned, 2 when opposite
    np.testing.assert_allclose(distill.cosine_embedding_loss(3 * t, t), 0.0, atol=1e-6)
    np.testing.assert_allclose(distill.cosine_embedding_loss(-t, t), 2.0, rtol=1e-6)
    check_grads(
        jax.jit(lambda s: distill.cosine_embedding_loss(s, t)), (s,), order=1, modes=["rev"]
    )
    # a zero vector (e.g. a padded hidden state) gives 1 and a finite gradient
    s[0, 0] = 0.0
    per_position = distill.cosine_embedding_loss(s, t, reduction="none")
    assert float(per_position[0, 0]) == 1.0
    assert np.isfinite(jax.grad(lambda s: distill.cosine_embedding_loss(s, t))(s)).all()


def test_attention_transfer(rng):
    s, t = _normal(rng, (4, 3, 5, 6)), _normal(rng, (4, 3, 5, 16))  # channels may differ
    mask = np.array([True, False, True, True])
    diff = _ref_at(s) - _ref_at(t)
    per_example = (diff**2).mean(-1)
    np.testing.assert_allclose(
        distill.attention_transfer(s, t, reduction="none"), per_example, rtol=RTOL, atol=ATOL
    )
    got = distill.attention_transfer(s, t, where=mask)
    np.testing.assert_allclose(got, per_example[mask].mean(), rtol=RTOL, atol=ATOL)
    # the authors' at_loss averages over batch and positions: the same as our mean
    np.testing.assert_allclose(distill.attention_transfer(s, t), (diff**2).mean(), rtol=RTOL)
    # invariant to a positive scale of either map
    np.testing.assert_allclose(
        distill.attention_transfer(10 * s, t), distill.attention_transfer(s, t), rtol=1e-5
    )
    check_grads(jax.jit(lambda s: distill.attention_transfer(s, t)), (s,), order=1, modes=["rev"])
    zero = np.zeros_like(s)
    assert np.isfinite(jax.grad(lambda s: distill.attention_transfer(s, t))(zero)).all()


def test_sum_count_over_a_mesh(rng):
    s, t = _normal(rng, (16, 4, 6)), _normal(rng, (16, 4, 6))
    mask = rng.random((16, 4)) < 0.5
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))

    def local(s, t, mask):
        pairs = [
            distill.hint_mse(s, t, where=mask, reduction="sum_count"),
            distill.cosine_embedding_loss(s, t, where=mask, reduction="sum_count"),
        ]
        return jax.lax.psum(jnp.stack([p[0] for p in pairs]), "data"), jax.lax.psum(
            jnp.stack([p[1] for p in pairs]), "data"
        )

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=(P(), P())))
    sums, counts = sharded(s, t, mask)
    expected = [
        distill.hint_mse(s, t, where=mask),
        distill.cosine_embedding_loss(s, t, where=mask),
    ]
    np.testing.assert_allclose(distill.mean_from_sum_count(sums, counts), expected, rtol=RTOL)


def test_bad_inputs(rng):
    s, t = _normal(rng, (2, 3, 4)), _normal(rng, (2, 3, 5))
    with pytest.raises(ValueError, match=r"projected student_feat has shape \(2, 3, 4\)"):
        distill.hint_mse(s, t)
    with pytest.raises(ValueError, match=r"projection has shape \(5, 5\)"):
        distill.hint_mse(s, t, np.ones((5, 5), np.float32))
    with pytest.raises(ValueError, match="first 2 axes must be equal"):
        distill.hint_mse(s, _normal(rng, (2, 4, 4)))
    with pytest.raises(ValueError, match="they must be equal"):
        distill.cosine_embedding_loss(s, t)
    with pytest.raises(ValueError, match="equal B and spatial sizes"):
        distill.attention_transfer(_normal(rng, (2, 4, 4, 3)), _normal(rng, (2, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"where has shape \(3,\)"):
        distill.attention_transfer(s[..., None], s[..., None], where=np.ones(3, bool))
