"""SparseGPT against a float64 numpy reference, magnitude pruning, and bad input."""

import warnings

import jax
import numpy as np
import pytest

from jaxcomp import ptq, sparsity
from tests.ptq import _reference as ref

K, N = 192, 48


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(1)
    x = ref.correlated_inputs(rng, 1024, K)
    w = rng.normal(size=(K, N)).astype(np.float32)
    return x, w, (2.0 * x.T @ x).astype(np.float32)


def _out_err(x, w, w_hat):
    return np.linalg.norm(x @ w - x @ np.asarray(w_hat, np.float64))


CASES = [
    (dict(sparsity=0.5), dict(sparsity=0.5)),
    (dict(sparsity=0.7), dict(sparsity=0.7)),
    (dict(pattern="2:4"), dict(nm=(2, 4))),
    (dict(pattern="1:4", bits=4, symmetric=False), dict(nm=(1, 4), bits=4, symmetric=False)),
    (dict(sparsity=0.5, bits=4), dict(sparsity=0.5, bits=4)),
]


@pytest.mark.parametrize("kw,ref_kw", CASES, ids=lambda c: str(c))
def test_matches_float64_reference(layer, kw, ref_kw):
    x, w, h = layer
    w_ref, keep_ref = ref.sparsegpt(w, h, **ref_kw)
    w_hat, keep = ptq.sparsegpt(w, h, **kw)
    assert keep.dtype == np.bool_ and keep.shape == w.shape
    # Masks are discrete: float32 vs float64 may swap two near-equal saliencies; allow 0.5%.
    assert np.mean(np.asarray(keep) != keep_ref) <= 0.005
    np.testing.assert_allclose(_out_err(x, w, w_hat), _out_err(x, w, w_ref), rtol=1e-3)
    assert np.all(np.asarray(w_hat)[~np.asarray(keep)] == 0)


def test_exact_counts(layer):
    _, w, h = layer
    _, keep = ptq.sparsegpt(w, h, sparsity=0.3)
    # 128-row block then 64-row block, each pruned to round(0.3 * rows * N) exactly.
    assert int((~keep[:128]).sum()) == round(0.3 * 128 * N)
    assert int((~keep[128:]).sum()) == round(0.3 * 64 * N)
    _, keep = ptq.sparsegpt(w, h, pattern="2:4")
    np.testing.assert_array_equal(np.asarray(keep).reshape(K // 4, 4, N).sum(axis=1), 2)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4")], ids=str)
def test_beats_magnitude(layer, kw):
    x, w, h = layer
    w_hat, _ = ptq.sparsegpt(w, h, **kw)
    mag = sparsity.compute_masks(
        {"k": w}, sparsity=kw.get("sparsity"), pattern=kw.get("pattern", "unstructured")
    )["k"]
    err_sgpt, err_mag = _out_err(x, w, w_hat), _out_err(x, w, w * np.asarray(mag))
    assert err_sgpt < 0.8 * err_mag, (err_sgpt, err_mag)


def test_jit_matches_eager(layer):
    _, w, h = layer
    eager = ptq.sparsegpt(w, h, pattern="2:4", bits=8)
    jitted = jax.jit(lambda w, h: ptq.sparsegpt(w, h, pattern="2:4", bits=8))(w, h)
    np.testing.assert_array_equal(jitted[1], eager[1])
    np.testing.assert_array_equal(jitted[0], eager[0])


def test_failed_cholesky_warns(rng):
    w = rng.normal(size=(2, 4)).astype(np.float32)
    h = np.array([[1.0, 1000.0], [1000.0, 1.0]], np.float32)
    with pytest.warns(UserWarning, match="attn_q.*magnitude"):
        w_hat, keep = ptq.sparsegpt(w, h, sparsity=0.5, name="attn_q")
    mag = sparsity.compute_masks({"k": w}, sparsity=0.5)["k"]
    np.testing.assert_array_equal(keep, mag)
    np.testing.assert_array_equal(w_hat, w * np.asarray(mag))


def test_bad_input(rng):
    w = rng.normal(size=(12, 4)).astype(np.float32)
    h = np.eye(12, dtype=np.float32)
    with pytest.raises(ValueError, match="fc.*'2:5' needs the 12 input rows"):
        ptq.sparsegpt(w, h, pattern="2:5", name="fc")
    with pytest.raises(ValueError, match="pattern is '4:2'"):
        ptq.sparsegpt(w, h, pattern="4:2")
    with pytest.raises(ValueError, match="sparsity 0.3 does not match"):
        ptq.sparsegpt(w, h, sparsity=0.3, pattern="2:4")
    with pytest.raises(ValueError, match=r"sparsity is 1\.0"):
        ptq.sparsegpt(w, h, sparsity=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w_hat, keep = ptq.sparsegpt(w, h, sparsity=0.0)
    np.testing.assert_array_equal(w_hat, w)
