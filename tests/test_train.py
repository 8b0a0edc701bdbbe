"""Train-step builders: one device, an 8-device mesh and pmap agree with a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcomp import train


def _linear_loss(params, batch, key):
    del key
    pred = batch["x"] @ params["w"] + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss}


def _numpy_sgd(w, b, batches, lr):
    """float64 reference of plain SGD on the mean squared error."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    for batch in batches:
        x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
        err = x @ w + b - y
        w = w - lr * 2 * x.T @ err / err.size
        b = b - lr * 2 * err.sum(0) / err.size
    return w, b


@pytest.fixture
def problem(rng):
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 3)) + 0.1).astype(np.float32)
    params = {"w": np.zeros((5, 3), np.float32), "b": np.zeros((3,), np.float32)}
    batches = list(train.batch_iterator({"x": x, "y": y}, 16, seed=0, epoch=0))
    return params, batches


def _run(step, tx, params, batches, prepare=lambda b: b):
    state = tx.init(params)
    key = jax.random.key(0)
    for batch in batches:
        params, state, metrics = step(params, state, prepare(batch), key)
    return params, metrics


def test_jit_step_matches_numpy_sgd(problem):
    params, batches = problem
    tx = optax.sgd(0.05)
    out, metrics = _run(
        train.make_train_step(_linear_loss, tx), tx, jax.tree.map(jnp.asarray, params), batches
    )
    w, b = _numpy_sgd(params["w"], params["b"], batches, 0.05)
    np.testing.assert_allclose(out["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b"], b, rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"loss", "mse"}


def test_mesh_step_matches_single_device(problem, standard_promotion):
    params, batches = problem
    mesh = train.data_mesh()
    assert mesh.devices.size == 8
    tx = optax.adam(1e-2)
    single, _ = _run(
        train.make_train_step(_linear_loss, tx), tx, jax.tree.map(jnp.asarray, params), batches
    )
    sharded, _ = _run(
        train.make_train_step(_linear_loss, tx, mesh=mesh),
        tx,
        train.replicate(params, mesh),
        batches,
        prepare=lambda b: train.shard_batch(b, mesh),
    )
    assert sharded["w"].sharding.is_fully_replicated
    np.testing.assert_allclose(sharded["w"], single["w"], rtol=1e-5, atol=1e-6)


def test_pmap_step_matches_single_device(problem, standard_promotion):
    params, batches = problem
    n = jax.local_device_count()
    tx = optax.adam(1e-2)
    single, _ = _run(
        train.make_train_step(_linear_loss, tx), tx, jax.tree.map(jnp.asarray, params), batches
    )
    step = train.make_pmap_train_step(_linear_loss, tx)
    p = train.stack_for_pmap(params)
    s = train.stack_for_pmap(tx.init(params))
    keys = jax.random.split(jax.random.key(0), n)
    for batch in batches:
        shaped = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), batch)
        p, s, _ = step(p, s, shaped, keys)
    np.testing.assert_allclose(p["w"][0], single["w"], rtol=1e-5, atol=1e-6)


def test_step_does_not_recompile(problem):
    params, batches = problem
    tx = optax.sgd(0.1)
    step = train.make_train_step(_linear_loss, tx)
    _run(step, tx, jax.tree.map(jnp.asarray, params), batches)
    assert step._cache_size() == 1


def test_shard_batch_rejects_indivisible_batch():
    mesh = train.data_mesh()
    with pytest.raises(ValueError, match="batch dimension 12 is not divisible by the 8 devices"):
        train.shard_batch({"x": np.zeros((12, 2), np.float32)}, mesh)


def test_batch_iterator_is_deterministic_and_covers_each_example_once():
    arrays = {"x": np.arange(100), "y": np.arange(100) * 2}
    a = list(train.batch_iterator(arrays, 10, seed=3, epoch=1))
    b = list(train.batch_iterator(arrays, 10, seed=3, epoch=1))
    c = list(train.batch_iterator(arrays, 10, seed=3, epoch=2))
    seen = np.concatenate([x["x"] for x in a])
    assert np.array_equal(seen, np.concatenate([x["x"] for x in b]))
    assert not np.array_equal(seen, np.concatenate([x["x"] for x in c]))
    assert sorted(seen.tolist()) == list(range(100))
    assert all(np.array_equal(x["y"], 2 * x["x"]) for x in a)


def test_predict_pads_last_batch_and_accuracy(rng):
    x = rng.normal(size=(37, 4)).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)

    def apply(p, inputs):
        return inputs @ p

    logits = train.predict(apply, w, x, batch_size=8)
    np.testing.assert_allclose(logits, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    y = np.argmax(x @ w, axis=-1)
    y[:5] = (y[:5] + 1) % 3
    assert train.accuracy(apply, w, x, y, batch_size=8) == pytest.approx(32 / 37)
