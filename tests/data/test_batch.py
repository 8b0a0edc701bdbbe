"""Deterministic batching of image splits and language-model windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxcomp.data as jd


@pytest.fixture
def split(rng):
    n = 37
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 2, 1))
    return jd.Split(x=np.ascontiguousarray(x), y=np.arange(n, dtype=np.int32))


def epoch_order(split, batch_size, **kwargs):
    out = [y for _, y in jd.batches(split, batch_size, **kwargs)]
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def test_every_example_once_per_epoch(split):
    for epoch in range(3):
        order = epoch_order(split, 8, seed=1, epoch=epoch, drop_remainder=False)
        np.testing.assert_array_equal(np.sort(order), np.arange(37))
    batches = list(jd.batches(split, 8, seed=1, drop_remainder=False))
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
    for x, y in batches:  # images travel with their labels
        np.testing.assert_array_equal(x[:, 0, 0, 0], y.astype(np.float32))


def test_drop_remainder(split):
    order = epoch_order(split, 8, seed=1)
    assert order.shape == (32,) and len(set(order.tolist())) == 32
    np.testing.assert_array_equal(order, epoch_order(split, 8, seed=1, drop_remainder=False)[:32])
    assert jd.num_batches(split, 8) == 4 and jd.num_batches(split, 8, drop_remainder=False) == 5
    assert jd.num_batches(split, 40) == 0 and epoch_order(split, 40, seed=0).size == 0
    assert len(list(jd.batches(split, 8, seed=0))) == jd.num_batches(split, 8)


def test_order_is_fixed_by_seed_and_epoch(split):
    a = epoch_order(split, 4, seed=7, epoch=2)
    np.testing.assert_array_equal(a, epoch_order(split, 4, seed=7, epoch=2))
    np.testing.assert_array_equal(a, np.random.default_rng((7, 2)).permutation(37)[:36])
    assert not np.array_equal(a, epoch_order(split, 4, seed=8, epoch=2))
    assert not np.array_equal(a, epoch_order(split, 4, seed=7, epoch=3))
    np.testing.assert_array_equal(epoch_order(split, 4, seed=7, shuffle=False), np.arange(36))


def test_batches_feed_jit_without_recompiling_and_shard_over_a_mesh(split):
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))

    @jax.jit
    def total(x, y):
        return jnp.sum(x[:, 0, 0, 0]) - jnp.sum(y).astype(jnp.float32)

    for epoch in range(2):
        for x, y in jd.batches(split, 8, seed=0, epoch=epoch):
            x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
            assert float(total(x, y)) == 0.0
    assert total._cache_size() == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0, seed=0), "batch_size must be a positive integer, got 0"),
        (dict(batch_size=2.0, seed=0), "batch_size must be a positive integer, got 2.0"),
        (dict(batch_size=2, seed=-3), "seed must be a non-negative integer, got -3"),
        (dict(batch_size=2, seed=0, epoch=-1), "epoch must be a non-negative integer"),
    ],
)
def test_batches_errors_at_the_call(split, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jd.batches(split, **kwargs)  # raised before iteration starts


def test_lm_windows_match_reference_slices(rng):
    ids = rng.integers(0, 50, 103)
    batches = list(jd.lm_batches(ids, 3, 10, seed=4, drop_remainder=False))
    assert jd.num_lm_batches(ids, 3, 10, drop_remainder=False) == len(batches) == 4
    windows = np.concatenate(batches)
    assert windows.shape == (10, 11) and windows.dtype == np.int32
    starts = np.random.default_rng((4, 0)).permutation(10) * 10
    np.testing.assert_array_equal(windows, np.stack([ids[s : s + 11] for s in starts]))
    # Inputs and targets: each token after the first is a target exactly once.
    targets = np.sort(np.concatenate([s + np.arange(1, 11) for s in starts]))
    np.testing.assert_array_equal(targets, np.arange(1, 101))


def test_lm_batches_are_deterministic_and_shaped(rng):
    ids = np.arange(200, dtype=np.int32)
    a = list(jd.lm_batches(ids, 4, 8, seed=1, epoch=0))
    assert len(a) == jd.num_lm_batches(ids, 4, 8) == 6  # 24 windows
    assert all(w.shape == (4, 9) for w in a)
    b = list(jd.lm_batches(ids, 4, 8, seed=1, epoch=0))
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    c = list(jd.lm_batches(ids, 4, 8, seed=1, epoch=1))
    assert not np.array_equal(np.stack(a), np.stack(c))
    ordered = next(jd.lm_batches(ids, 2, 8, seed=0, shuffle=False))
    np.testing.assert_array_equal(ordered, [np.arange(9), np.arange(8, 17)])
    np.testing.assert_array_equal(np.diff(np.stack(a), axis=-1), 1)  # contiguous windows


@pytest.mark.parametrize(
    "ids, kwargs, message",
    [
        (np.arange(8), dict(seq_len=8), "ids has 8 tokens, fewer than seq_len \\+ 1 = 9"),
        (np.zeros((2, 9), np.int32), dict(seq_len=4), "1-D integer array"),
        (np.zeros(9, np.float32), dict(seq_len=4), "1-D integer array, got float32"),
        (np.arange(20), dict(seq_len=0), "seq_len must be a positive integer"),
    ],
)
def test_lm_batches_errors(ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        jd.lm_batches(ids, 2, seed=0, **kwargs)
    with pytest.raises(ValueError, match=message):
        jd.num_lm_batches(ids, 2, **kwargs)
