"""keep_masks and prune: pruned weights stay exactly 0 under real optimizers, under jit/pmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcomp.sparsity as sp


def _lenient(inner):
    """optax 0.2.8's adam bias correction (float ** int32) fails strict dtype promotion, which
    conftest turns on; run only the inner optimizer under standard promotion."""

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return inner.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def _init(rng):
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((8, 16)) * 0.5, jnp.float32),
            "bias": jnp.zeros(16, jnp.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.standard_normal((16, 4)) * 0.5, jnp.float32),
            "bias": jnp.zeros(4, jnp.float32),
        },
    }


def _data(rng, n=32):
    x = jnp.asarray(rng.standard_normal((n, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((n, 4)), jnp.float32)
    return x, y


def _loss(params, x, y):
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    return jnp.mean((out - y) ** 2)


def _step_fn(tx):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _kernels(tree):
    return [np.asarray(tree[f"Dense_{i}"]["kernel"]) for i in range(2)]


@pytest.mark.parametrize(
    "inner",
    [
        lambda: _lenient(optax.adam(1e-2)),
        lambda: _lenient(optax.adamw(1e-2, weight_decay=0.1)),
        lambda: optax.sgd(1e-2, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd_momentum"],
)
def test_keep_masks_keeps_pruned_weights_at_zero(rng, inner):
    params = _init(rng)
    masks = sp.compute_masks(params, sparsity=0.6)
    params = sp.apply_masks(params, masks)
    start = _kernels(params)
    tx = optax.chain(inner(), sp.keep_masks(masks))
    state = tx.init(params)
    step = _step_fn(tx)
    x, y = _data(rng)
    for _ in range(200):
        params, state = step(params, state, x, y)
    assert step._cache_size() == 1
    for w, w0, m in zip(_kernels(params), start, _kernels(masks), strict=True):
        assert np.all(w[~m] == 0.0)
        # kept weights move, except those feeding or fed by a unit pruned to nothing
        assert np.mean(w[m] != w0[m]) > 0.75
    assert np.any(np.asarray(params["Dense_0"]["bias"]) != 0.0)


def _pmap_step_fn(tx):
    """A pmap'd train step with gradients averaged over the ``"batch"`` axis."""

    def step(params, state, x, y):
        grads = jax.lax.pmean(jax.grad(_loss)(params, x, y), "batch")
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.pmap(step, axis_name="batch")


def _replicate(tree, n):
    return jax.tree.map(lambda a: jnp.stack([a] * n), tree)


def test_keep_masks_under_pmap_with_replicated_params(rng):
    params = _init(rng)
    masks = sp.compute_masks(params, sparsity=0.5)
    params = sp.apply_masks(params, masks)
    tx = optax.chain(_lenient(optax.adamw(1e-2, weight_decay=0.1)), sp.keep_masks(masks))
    n = jax.device_count()
    assert n == 8
    pstep = _pmap_step_fn(tx)
    rparams, rstate = _replicate(params, n), _replicate(tx.init(params), n)
    x, y = _data(rng, n=64)
    for _ in range(10):
        rparams, rstate = pstep(rparams, rstate, x.reshape(n, 8, 8), y.reshape(n, 8, 4))
    for w, m in zip(_kernels(rparams), _kernels(masks), strict=True):
        assert np.all(w[:, ~m] == 0.0)
        assert np.all(w == w[:1])
        assert np.any(w[:, m] != 0.0)


def test_keep_masks_checks_masks_against_params(rng):
    params = _init(rng)
    masks = sp.compute_masks(params)
    masks["Dense_1"]["kernel"] = masks["Dense_1"]["kernel"].T
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sp.keep_masks(masks).init(params)
    with pytest.raises(TypeError, match="bool"):
        sp.keep_masks({"w": jnp.ones(3, jnp.float32)})


def test_prune_follows_the_schedule(rng):
    params = _init(rng)
    sched = sp.polynomial_schedule(
        0.75, begin_step=2, end_step=12, frequency=2, initial_sparsity=0.25
    )
    inner = _lenient(optax.adamw(1e-2, weight_decay=0.1))
    tx = sp.prune(inner, schedule=sched)
    state = tx.init(params)
    assert all(m.all() for m in _kernels(state.masks))
    step = _step_fn(tx)
    inner_update = jax.jit(inner.update)
    x, y = _data(rng)
    for t in range(18):
        grads = jax.grad(_loss)(params, x, y)
        inner_updates, _ = inner_update(grads, state.inner_state, params)
        old_masks = state.masks
        new_params, state = step(params, state, x, y)
        assert int(state.count) == t + 1
        is_update = bool(sched.is_update_step(t))
        s_t = np.float32(sched.sparsity(t))
        for w, m, old, u, p in zip(
            _kernels(new_params),
            _kernels(state.masks),
            _kernels(old_masks),
            _kernels(inner_updates),
            _kernels(params),
            strict=True,
        ):
            if not is_update:
                np.testing.assert_array_equal(m, old)
            elif t >= 2:
                assert m.size - m.sum() == np.round(s_t * np.float32(m.size))
                assert not np.any(m & ~old)
            assert np.all(w[~m] == 0.0)
            # inner updates recomputed outside the step may differ in the last bit (fusion)
            np.testing.assert_allclose(w, np.where(m, p + u, 0.0), rtol=1e-6, atol=1e-7)
        if t == 2:
            candidate = optax.apply_updates(params, inner_updates)
            first = sp.compute_masks(candidate, sparsity=float(s_t))
            for a, b in zip(_kernels(state.masks), _kernels(first), strict=True):
                np.testing.assert_array_equal(a, b)
        if is_update:
            adam = state.inner_state[0]
            for mu, nu, m in zip(
                _kernels(adam.mu), _kernels(adam.nu), _kernels(state.masks), strict=True
            ):
                assert np.all(mu[~m] == 0.0) and np.all(nu[~m] == 0.0)
                assert np.all(nu[m] > 0.0)
        params = new_params
    assert step._cache_size() == 1
    for w, m in zip(_kernels(params), _kernels(state.masks), strict=True):
        assert m.size - m.sum() == round(0.75 * m.size)
        assert np.all(w[~m] == 0.0)


def test_prune_lands_exactly_on_masked_params_plus_updates(rng):
    params = _init(rng)
    lr = 0.05
    tx = sp.prune(optax.sgd(lr), schedule=sp.polynomial_schedule(0.5, 0, 4))
    state = tx.init(params)
    update = jax.jit(tx.update)
    x, y = _data(rng)
    for _ in range(6):
        grads = jax.jit(jax.grad(_loss))(params, x, y)
        updates, state = update(grads, state, params)
        new = optax.apply_updates(params, updates)
        for w, m, p, g in zip(
            _kernels(new), _kernels(state.masks), _kernels(params), _kernels(grads), strict=True
        ):
            np.testing.assert_array_equal(w, np.where(m, p + np.float32(-lr) * g, 0.0))
        params = new
    assert update._cache_size() == 1


def test_prune_n_m_one_shot_in_a_chain(rng):
    params = _init(rng)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        sp.prune(
            optax.sgd(1e-2, momentum=0.9), schedule=sp.one_shot_schedule(0.5, 3), pattern="2:4"
        ),
    )
    state = tx.init(params)
    step = _step_fn(tx)
    x, y = _data(rng)
    for t in range(6):
        params, state = step(params, state, x, y)
        masks = state[1].masks
        for w, m in zip(_kernels(params), _kernels(masks), strict=True):
            if t < 3:
                assert m.all()
            else:
                assert (m.reshape(-1, 4, m.shape[1]).sum(axis=1) == 2).all()
                assert np.all(w[~m] == 0.0)
    assert step._cache_size() == 1
    with pytest.raises(ValueError, match="contradicts"):
        sp.prune(optax.sgd(0.1), schedule=sp.one_shot_schedule(0.6, 3), pattern="2:4").init(params)


def test_prune_global_scope_and_errors(rng):
    params = _init(rng)
    tx = sp.prune(_lenient(optax.adam(1e-2)), schedule=sp.one_shot_schedule(0.7, 0), scope="global")
    state = tx.init(params)
    grads = jax.grad(_loss)(params, *_data(rng))
    _, state = jax.jit(tx.update)(grads, state, params)
    kept = sum(int(m.sum()) for m in _kernels(state.masks))
    assert 192 - kept == np.round(np.float32(0.7) * np.float32(192))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda p: rows if p.ndim == 2 else replicated, params)
    sharded = jax.device_put(params, shardings)
    _, sharded_state = jax.jit(tx.update)(grads, tx.init(sharded), sharded)
    for a, b in zip(_kernels(sharded_state.masks), _kernels(state.masks), strict=True):
        np.testing.assert_array_equal(a, b)
    ruled = sp.prune(
        optax.sgd(0.1),
        schedule=sp.polynomial_schedule(0.75, 0, 2),
        rules=[("Dense_0/kernel", 0.5)],
    )
    rstate = ruled.init(params)
    for _ in range(3):
        _, rstate = jax.jit(ruled.update)(grads, rstate, params)
    m0, m1 = _kernels(rstate.masks)
    assert (m0.size - m0.sum(), m1.size - m1.sum()) == (64, 48)
    with pytest.raises(ValueError, match="update\\(updates, state, params\\)"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="key="):
        sp.prune(optax.adam(1e-2), schedule=sp.one_shot_schedule(0.7, 0), score="random")


def test_prune_nnx_state():
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    tx = sp.prune(_lenient(optax.adam(1e-2)), schedule=sp.one_shot_schedule(0.5, 1))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert isinstance(params, nnx.State) and isinstance(state.masks, nnx.State)
    for layer in params["layers"]:
        w = np.asarray(params["layers"][layer]["kernel"][...])
        assert np.count_nonzero(w) == w.size // 2
        assert state.masks["layers"][layer]["bias"].get_value() is None


def test_prune_random_and_saliency_scores(rng):
    params = _init(rng)
    grads = jax.grad(_loss)(params, *_data(rng))
    sched = sp.one_shot_schedule(0.5, 0)
    rand = sp.prune(optax.sgd(0.0), schedule=sched, score="random", key=jax.random.key(0))
    _, state = jax.jit(rand.update)(grads, rand.init(params), params)
    expected = sp.compute_masks(
        params, sparsity=0.5, score="random", key=jax.random.fold_in(jax.random.key(0), 0)
    )
    for a, b in zip(_kernels(state.masks), _kernels(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    # previously pruned entries stay pruned while the sparsity grows, whatever the score
    gradual = sp.prune(
        optax.sgd(0.0),
        schedule=sp.polynomial_schedule(0.75, 1, 4),
        score="random",
        key=jax.random.key(1),
    )
    gstate = gradual.init(params)
    update = jax.jit(gradual.update)
    for _ in range(5):
        old = gstate.masks
        _, gstate = update(grads, gstate, params)
        for new_m, old_m in zip(_kernels(gstate.masks), _kernels(old), strict=True):
            assert not np.any(new_m & ~old_m)
    assert all(m.size - m.sum() == 0.75 * m.size for m in _kernels(gstate.masks))
    sal = sp.prune(optax.sgd(0.0), schedule=sched, score="saliency")
    _, state = jax.jit(sal.update)(grads, sal.init(params), params)
    expected = sp.compute_masks(params, sparsity=0.5, score="saliency", grads=grads)
    for a, b in zip(_kernels(state.masks), _kernels(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_prune_under_pmap_matches_one_device(rng):
    """8 replicas with pmean'd gradients prune exactly as one device on the whole batch."""
    params = _init(rng)
    sched = sp.polynomial_schedule(0.75, begin_step=0, end_step=6, frequency=2)
    tx = sp.prune(optax.sgd(0.05, momentum=0.9), schedule=sched)
    n = jax.device_count()
    pstep = _pmap_step_fn(tx)
    rparams, rstate = _replicate(params, n), _replicate(tx.init(params), n)
    single, sstate = params, tx.init(params)
    one = _step_fn(tx)
    x, y = _data(rng, n=64)
    for _ in range(9):
        rparams, rstate = pstep(rparams, rstate, x.reshape(n, 8, 8), y.reshape(n, 8, 4))
        single, sstate = one(single, sstate, x, y)
    for w, m, ws, ms in zip(
        _kernels(rparams),
        _kernels(rstate.masks),
        _kernels(single),
        _kernels(sstate.masks),
        strict=True,
    ):
        assert np.all(m == m[:1]) and np.all(w == w[:1])  # replicas agree exactly
        np.testing.assert_array_equal(m[0], ms)  # same masks as one device
        assert m[0].size - m[0].sum() == round(0.75 * m[0].size)
        assert np.all(w[:, ~m[0]] == 0.0)
        # the mean over 8 shards of 8 rows vs one mean over 64 rows: float32 summation order
        np.testing.assert_allclose(w[0], ws, rtol=1e-5, atol=1e-6)
