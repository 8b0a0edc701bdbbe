"""keep_masks and prune inside optax.chain, inject_hyperparams and MultiSteps, and on a mesh."""

import jax
import numpy as np
import optax

import jaxcomp.sparsity as sp
from jaxcomp import train
from tests.sparsity.test_optax import _data, _init, _kernels, _loss, _step_fn


def _run(tx, params, x, y, steps):
    step = _step_fn(tx)
    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state, x, y)
    return params, state, step


def test_prune_inside_multisteps_with_injected_hyperparams(rng, standard_promotion):
    params, (x, y) = _init(rng), _data(rng)
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
    schedule = sp.polynomial_schedule(0.75, begin_step=0, end_step=4, frequency=2)
    tx = optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), sp.prune(inner, schedule=schedule)),
        every_k_schedule=3,
    )
    out, state, step = _run(tx, params, x, y, steps=30)  # 10 inner updates
    for k in _kernels(out):
        assert np.count_nonzero(k) == k.size - round(0.75 * k.size)
    assert step._cache_size() == 1
    # the injected learning rate is still reachable and drives the inner optimizer
    inner_state = state.inner_opt_state[1].inner_state
    assert inner_state.hyperparams["learning_rate"] == np.float32(1e-2)


def test_keep_masks_with_injected_hyperparams_and_multisteps(rng, standard_promotion):
    params = _init(rng)
    x, y = _data(rng)
    masks = sp.compute_masks(params, sparsity=0.5)
    params = sp.apply_masks(params, masks)
    tx = optax.MultiSteps(
        optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), sp.keep_masks(masks)),
        every_k_schedule=2,
    )
    out, _, _ = _run(tx, params, x, y, steps=40)
    for k, m, k0 in zip(_kernels(out), _kernels(masks), _kernels(params), strict=True):
        assert np.all(k[~m] == 0.0)
        assert np.any(k[m] != k0[m])


def test_prune_on_an_8_device_mesh_matches_one_device(rng, standard_promotion):
    params, (x, y) = _init(rng), _data(rng)
    schedule = sp.polynomial_schedule(0.5, begin_step=0, end_step=6, frequency=2)
    tx = sp.prune(optax.adam(1e-2), schedule=schedule)
    single, _, _ = _run(tx, params, x, y, steps=8)

    mesh = train.data_mesh()

    def loss_fn(p, batch, key):
        del key
        return _loss(p, batch["x"], batch["y"]), {}

    step = train.make_train_step(loss_fn, tx, mesh=mesh)
    p = train.replicate(params, mesh)
    s = train.replicate(tx.init(params), mesh)
    batch = train.shard_batch({"x": np.asarray(x), "y": np.asarray(y)}, mesh)
    for _ in range(8):
        p, s, _ = step(p, s, batch, jax.random.key(0))
    for a, b in zip(_kernels(p), _kernels(single), strict=True):
        np.testing.assert_array_equal(a == 0, b == 0)  # identical masks
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
