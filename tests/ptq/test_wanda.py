"""Wanda against a float64 numpy reference."""

import jax
import numpy as np
import pytest

from jaxcomp import ptq


def _ref(w, norm, sparsity):
    score = np.abs(w.astype(np.float64)) * norm[:, None]
    k = round(sparsity * w.shape[0])
    keep = np.ones(w.shape, bool)
    for j in range(w.shape[1]):  # per output column; ties: the lower index is pruned first
        keep[np.argsort(score[:, j], kind="stable")[:k], j] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_matches_reference_per_output(rng, sparsity):
    w = rng.normal(size=(40, 6)).astype(np.float32)
    norm = np.exp(rng.normal(size=40)).astype(np.float32)
    w_p, keep = jax.jit(lambda w, n: ptq.wanda(w, n, sparsity=sparsity))(w, norm)
    np.testing.assert_array_equal(keep, _ref(w, norm, sparsity))
    np.testing.assert_array_equal(w_p, np.where(keep, w, 0))
    np.testing.assert_array_equal(np.asarray(keep).sum(0), 40 - round(sparsity * 40))


def test_input_norm_changes_the_choice(rng):
    w = np.ones((4, 2), np.float32)
    _, keep = ptq.wanda(w, np.array([1.0, 4.0, 3.0, 2.0], np.float32))
    np.testing.assert_array_equal(keep[:, 0], [False, True, True, False])


def test_n_m_and_bad_input(rng):
    w = rng.normal(size=(16, 3)).astype(np.float32)
    norm = np.exp(rng.normal(size=16)).astype(np.float32)
    _, keep = ptq.wanda(w, norm, pattern="2:4")
    score = np.abs(w) * norm[:, None]
    groups = score.reshape(4, 4, 3)
    kept = np.asarray(keep).reshape(4, 4, 3)
    np.testing.assert_array_equal(kept.sum(1), 2)
    assert np.all(groups[kept].min() >= 0)
    for g in range(4):
        for j in range(3):
            assert set(np.argsort(-groups[g, :, j], kind="stable")[:2]) == set(
                np.flatnonzero(kept[g, :, j])
            )
    with pytest.raises(ValueError, match=r"fc2: input_norm has shape \(3,\)"):
        ptq.wanda(w, np.ones(3, np.float32), name="fc2")
