"""summary / format_summary against numpy counts."""

import jax.numpy as jnp
import numpy as np

import jaxcomp.sparsity as sp


def test_summary_rows_and_total(rng):
    w = rng.standard_normal((7, 3)).astype(np.float32)
    w[rng.random((7, 3)) < 0.4] = 0.0
    b = np.array([0.0, 1.0, 0.0], np.float32)
    rows = sp.summary({"a": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}})
    assert [r.path for r in rows] == ["a/bias", "a/kernel", "total"]
    assert rows[0] == sp.SummaryRow("a/bias", (3,), 3, 1, 1.0 - 1 / 3)
    kept = int(np.count_nonzero(w))
    assert rows[1] == sp.SummaryRow("a/kernel", (7, 3), 21, kept, 1.0 - kept / 21)
    assert rows[2] == sp.SummaryRow("total", None, 24, kept + 1, 1.0 - (kept + 1) / 24)


def test_summary_of_masks_skips_dense_leaves_and_formats():
    masks = {"k": jnp.array([[True, False], [False, False]]), "b": None}
    rows = sp.summary(masks)
    assert [(r.path, r.kept, r.size) for r in rows] == [("k", 1, 4), ("total", 1, 4)]
    text = sp.format_summary(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "size", "kept", "sparsity"]
    assert lines[1].split() == ["k", "2x2", "4", "1", "75.00%"]
    assert set(lines[2]) == {"-"}
    assert lines[3].split() == ["total", "4", "1", "75.00%"]
    assert sp.summary({})[-1] == sp.SummaryRow("total", None, 0, 0, 0.0)
