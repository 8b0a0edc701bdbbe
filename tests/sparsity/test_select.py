"""Exact top-k by a bracketed counting search: numpy references, ties, sample misses, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.sparsity import _select

_MAX_KEY = 0xFFFFFFFF


def _reference(scores, keep):
    """float64 numpy masks: the `keep[g]` largest of row g (NaN lowest), lower index first."""
    row = np.concatenate([np.asarray(s, np.float64) for s in scores], axis=1)
    row = np.where(np.isnan(row), -np.inf, row)
    out = np.zeros(row.shape, bool)
    for g in range(row.shape[0]):
        order = np.lexsort((np.arange(row.shape[1]), -row[g]))
        out[g, order[: keep[g]]] = True
    return out


@jax.jit
def _run(scores, keep):
    keys = [_select._sortable_keys(s) for s in scores]
    search = _select._search_threshold(keys, keep)
    return jnp.concatenate(_select._keep_top(keys, keep), axis=1), search


def _scores(rng, kind, shape):
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "magnitude":
        return np.abs(rng.standard_normal(shape)).astype(np.float32)
    if kind == "few_values":  # huge blocks of ties
        return rng.integers(0, 4, shape).astype(np.float32)
    if kind == "bfloat16":  # 2^16 distinct values: ties at every threshold
        return np.abs(rng.standard_normal(shape)).astype(jnp.bfloat16).astype(np.float32)
    if kind == "constant":
        return np.full(shape, 0.25, np.float32)
    x = rng.standard_normal(shape).astype(np.float32)  # "special": NaN, +-0, +-inf
    flat = x.reshape(-1)
    for value in (np.nan, 0.0, -0.0, np.inf, -np.inf):
        flat[rng.integers(0, flat.size, 40)] = value
    return x


def _check(rng, kind, widths, rows, n_keeps=3):
    scores = [_scores(rng, kind, (rows, w)) for w in widths]
    n = sum(widths)
    for keep in [np.zeros(rows, np.int32), np.full(rows, n, np.int32)] + [
        rng.integers(0, n + 1, rows).astype(np.int32) for _ in range(n_keeps)
    ]:
        mask, search = _run([jnp.asarray(s) for s in scores], jnp.asarray(keep))
        ref = _reference(scores, keep)
        np.testing.assert_array_equal(np.asarray(mask), ref)
        np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), keep)
        row = np.concatenate(scores, axis=1)
        keys = np.asarray(_select._sortable_keys(jnp.asarray(row)))
        t = np.asarray(search.threshold)
        np.testing.assert_array_equal(np.asarray(search.above), (keys > t[:, None]).sum(1))
        np.testing.assert_array_equal(np.asarray(search.at_least), (keys >= t[:, None]).sum(1))
        for g in range(rows):
            expected = _MAX_KEY if keep[g] == 0 else np.sort(keys[g])[::-1][keep[g] - 1]
            assert t[g] == expected
    return search


KINDS = ("normal", "magnitude", "few_values", "bfloat16", "constant", "special")


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_search_is_exact(rng, kind):
    # rows of 20000 > _FULL_SAMPLE entries, over two arrays: the strided-sample bracket path
    _check(rng, kind, widths=(12_000, 8_000), rows=2)


@pytest.mark.parametrize("kind", ("few_values", "bfloat16", "constant"))
def test_ties_in_long_rows_are_ranked_blockwise_and_exactly(rng, kind):
    # arrays of >= 4 * TIE_BLOCK columns rank their ties block by block; the cut falls
    # inside a block, on a block edge, or in the second array, depending on keep
    width = 4 * _select.TIE_BLOCK
    _check(rng, kind, widths=(width + 123, width), rows=2, n_keeps=4)


@pytest.mark.parametrize("kind", KINDS)
def test_short_rows_are_exact(rng, kind):
    # rows short enough to sample every entry; three arrays, one narrower than the stride
    _check(rng, kind, widths=(700, 40, 1500), rows=3)


def test_continuous_scores_need_few_passes(rng):
    scores = [jnp.asarray(np.abs(rng.standard_normal((1, 200_000))), jnp.float32)]
    for fraction in (0.02, 0.1, 0.5, 0.9):
        keep = jnp.asarray([round(fraction * 200_000)], jnp.int32)
        _, search = _run(scores, keep)
        assert int(search.steps) <= 12, (fraction, int(search.steps))
        assert not bool(search.missed[0])


def test_ties_stay_within_the_bisection_bound(rng):
    scores = [jnp.asarray(rng.integers(0, 4, (1, 30_000)), jnp.float32)]
    for keep in (1, 7_000, 15_001, 29_999):
        _, search = _run(scores, jnp.asarray([keep], jnp.int32))
        assert int(search.steps) <= 40, (keep, int(search.steps))


@pytest.mark.parametrize("sample_value", [1e6, -1e6])
def test_misleading_sample_misses_the_bracket_and_stays_exact(rng, sample_value):
    # every sampled entry (every 61st) is an outlier: the sample bracket lies entirely on
    # one side of the true threshold, and the search must recover from the miss
    x = np.abs(rng.standard_normal((1, 61 * 400))).astype(np.float32)
    x[:, :: _select._STRIDE] = sample_value
    keep = np.asarray([5_000], np.int32)
    mask, search = _run([jnp.asarray(x)], jnp.asarray(keep))
    assert bool(search.missed[0])
    np.testing.assert_array_equal(np.asarray(mask), _reference([x], keep))


def test_traced_keep_does_not_recompile(rng):
    scores = [jnp.asarray(rng.standard_normal((2, 9_000)), jnp.float32)]
    fn = jax.jit(lambda s, k: _select._keep_top([_select._sortable_keys(s[0])], k)[0])
    for keep in ([0, 9_000], [1, 17], [4_500, 8_999]):
        mask = fn(scores, jnp.asarray(keep, jnp.int32))
        np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), keep)
    assert fn._cache_size() == 1


def test_key_values_invert_sortable_keys(rng):
    x = rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)
    # (subnormals are left out: XLA on CPU flushes them to zero, so they tie with 0)
    x = np.concatenate([x, [np.inf, -np.inf, 0.0, 1e-37, -1e-37]]).astype(np.float32)
    keys = _select._sortable_keys(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(_select._key_values(keys)), x)
    assert np.all(np.diff(np.asarray(keys)[np.argsort(x, kind="stable")].astype(np.int64)) >= 0)
