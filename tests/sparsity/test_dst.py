"""RigL and SET: exact counts, numpy reference of a swap, dense leaves, composition, mesh/pmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcomp.sparsity as sp
from jaxcomp.train import data_mesh, replicate, shard_batch
from tests.sparsity.test_optax import _data, _init, _loss


def _setup(rng, sparsity=0.75, dense=()):
    params = _init(rng)
    rules = [(f"^{name}/", None) for name in dense]
    masks = sp.compute_masks(
        params, sparsity=sparsity, score="random", key=jax.random.key(3), rules=rules
    )
    return sp.apply_masks(params, masks), masks


def _counts(masks):
    return [int(m.sum()) for m in jax.tree.leaves(masks)]


def _swap_reference(mask, w, score, fraction):
    """One RigL/SET swap in float64 numpy with stable (index-ordered) ties."""
    mask, w, score = mask.ravel(), np.abs(w.ravel().astype(np.float64)), score.ravel()
    active = int(mask.sum())
    n_drop = min(int(np.round(np.float32(fraction) * np.float32(active))), active)
    order = np.lexsort((np.arange(w.size), -np.where(mask, w, -np.inf)))
    kept = np.zeros_like(mask)
    kept[order[: active - n_drop]] = True
    grow_order = np.lexsort((np.arange(w.size), -np.where(kept, -np.inf, score)))
    new = kept.copy()
    new[grow_order[:n_drop]] = True
    return new, kept


@pytest.mark.parametrize("regrow", ["gradient", "random"])
def test_swap_matches_numpy_and_regrown_weights_and_moments_are_zero(rng, regrow):
    params, masks = _setup(rng)
    key = jax.random.key(5) if regrow == "random" else None
    inner = optax.sgd(0.05, momentum=0.9)
    tx = sp.dynamic_sparse(
        inner, masks, regrow=regrow, frequency=3, end_step=30, drop_fraction=0.4, key=key
    )
    state = tx.init(params)
    x, y = _data(rng)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x, y), s, p))
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    # step t = 3 is an update step: redo it by hand in numpy
    grads = jax.grad(_loss)(params, x, y)
    inner_updates, _ = inner.update(grads, state.inner_state, params)
    candidate = sp.apply_masks(optax.apply_updates(params, inner_updates), state.masks)
    fraction = float(sp.cosine_drop_fraction(3, 0.4, 30))
    old_masks = state.masks
    updates, state = step(params, state)
    new_params = optax.apply_updates(params, updates)
    for i, name in enumerate(("Dense_0", "Dense_1")):
        old = np.asarray(old_masks[name]["kernel"])
        if regrow == "gradient":
            score = np.abs(np.asarray(grads[name]["kernel"], np.float64))
        else:
            leaf_key = jax.random.fold_in(jax.random.fold_in(key, 3), 2 * i + 1)
            score = np.asarray(jax.random.uniform(leaf_key, old.shape), np.float64)
        want, kept = _swap_reference(old, np.asarray(candidate[name]["kernel"]), score, fraction)
        got = np.asarray(state.masks[name]["kernel"]).ravel()
        np.testing.assert_array_equal(got, want)
        assert got.sum() == old.sum() and np.any(got != old.ravel())
        w = np.asarray(new_params[name]["kernel"]).ravel()
        assert np.all(w[~kept] == 0.0)  # dropped and regrown weights are exactly 0
        # jit vs eager fusions of w + u may round differently by 1 ulp
        np.testing.assert_allclose(
            w[kept], np.asarray(candidate[name]["kernel"]).ravel()[kept], rtol=2e-7, atol=0
        )
        trace = np.asarray(state.inner_state[0].trace[name]["kernel"]).ravel()
        assert np.all(trace[~kept] == 0.0) and np.any(trace[kept] != 0.0)


def test_counts_exact_masks_move_only_on_update_steps_no_recompile(rng, standard_promotion):
    params, masks = _setup(rng, sparsity=0.5, dense=("Dense_1",))  # a dense kernel too
    tx = sp.rigl(optax.adam(1e-2), masks, frequency=4, end_step=24, drop_fraction=0.5)
    state = tx.init(params)
    x, y = _data(rng)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(None)
        updates, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    want = _counts(masks)
    previous = masks
    for t in range(32):
        params, state = step(params, state)
        assert _counts(state.masks) == want
        m = np.asarray(state.masks["Dense_0"]["kernel"])
        moved = np.any(m != previous["Dense_0"]["kernel"])
        assert moved == (t > 0 and t % 4 == 0 and t < 24), t
        assert np.all(np.asarray(params["Dense_0"]["kernel"])[~m] == 0.0)
        assert np.count_nonzero(params["Dense_1"]["kernel"]) == 64  # dense leaf keeps training
        previous = state.masks
    assert len(traces) == 1


def test_dense_leaves_get_the_inner_update(rng, standard_promotion):
    params, masks = _setup(rng, dense=("Dense_1",))
    inner = optax.adamw(1e-2, weight_decay=0.1)
    tx = sp.rigl(inner, masks, frequency=1, end_step=10)
    x, y = _data(rng)
    grads = jax.grad(_loss)(params, x, y)
    state = tx.init(params)
    state = state._replace(count=jnp.asarray(1, jnp.int32))  # an update step
    updates, _ = jax.jit(tx.update)(grads, state, params)
    plain, _ = inner.update(grads, inner.init(params), params)
    for name, leaf in (("Dense_0", "bias"), ("Dense_1", "bias"), ("Dense_1", "kernel")):
        # jit vs eager: adam's sqrt/divide fusions may differ by an ulp
        np.testing.assert_allclose(updates[name][leaf], plain[name][leaf], rtol=1e-6, atol=1e-9)


def test_composes_with_chain_inject_hyperparams_and_multisteps(rng, standard_promotion):
    params, masks = _setup(rng)
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    tx = optax.MultiSteps(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            sp.set_(inner, masks, key=jax.random.key(0), frequency=2, end_step=20),
        ),
        every_k_schedule=2,
    )
    state = tx.init(params)
    x, y = _data(rng)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    start = params
    for _ in range(12):
        params, state = step(params, state)
        dst = state.inner_opt_state[1]
        assert _counts(dst.masks) == _counts(masks)
        for name in ("Dense_0", "Dense_1"):
            m = np.asarray(dst.masks[name]["kernel"])
            assert np.all(np.asarray(params[name]["kernel"])[~m] == 0.0)
    assert int(dst.count) == 6  # MultiSteps: one inner step per 2 calls
    assert np.any(np.asarray(dst.masks["Dense_0"]["kernel"]) != masks["Dense_0"]["kernel"])
    assert not np.allclose(params["Dense_0"]["bias"], start["Dense_0"]["bias"])


def _run(params, masks, x, y, sharded: bool, steps=9):
    tx = sp.rigl(optax.sgd(0.1, momentum=0.9), masks, frequency=3, end_step=30)
    state = tx.init(params)
    if sharded:
        mesh = data_mesh()
        params, state = replicate(params, mesh), replicate(state, mesh)
        x, y = shard_batch((x, y), mesh)

    @jax.jit
    def step(p, s, x, y):
        updates, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(steps):
        params, state = step(params, state, x, y)
    return params, state


def test_8_device_mesh_equals_1_device(rng):
    params, masks = _setup(rng)
    x, y = _data(rng, n=64)
    p1, s1 = _run(params, masks, x, y, sharded=False)
    p8, s8 = _run(params, masks, x, y, sharded=True)
    assert len(p8["Dense_0"]["kernel"].sharding.device_set) == 8
    assert p8["Dense_0"]["kernel"].sharding.is_equivalent_to(NamedSharding(data_mesh(), P()), 2)
    jax.tree.map(np.testing.assert_array_equal, s8.masks, s1.masks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p8, p1)


def test_under_pmap_replicas_agree(rng):
    params, masks = _setup(rng)
    tx = sp.rigl(optax.sgd(0.1), masks, frequency=2, end_step=20)
    n = jax.device_count()

    def step(p, s, x, y):
        grads = jax.lax.pmean(jax.grad(_loss)(p, x, y), "batch")
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    pstep = jax.pmap(step, axis_name="batch")
    stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * n), tree)  # noqa: E731
    rparams, rstate = stack(params), stack(tx.init(params))
    x, y = _data(rng, n=64)
    for _ in range(5):
        rparams, rstate = pstep(rparams, rstate, x.reshape(n, 8, 8), y.reshape(n, 8, 4))
    for m in jax.tree.leaves(rstate.masks):
        m = np.asarray(m)
        assert np.all(m == m[:1])
    assert _counts(jax.tree.map(lambda m: m[0], rstate.masks)) == _counts(masks)
    assert np.any(np.asarray(rstate.masks["Dense_0"]["kernel"][0]) != masks["Dense_0"]["kernel"])


def test_bad_input(rng):
    params, masks = _setup(rng)
    bad = {"Dense_0": masks["Dense_0"], "Dense_9": masks["Dense_1"]}
    with pytest.raises(ValueError, match="Dense_1"):
        sp.rigl(optax.sgd(0.1), bad).init(params)
    wrong = {**masks, "Dense_1": {**masks["Dense_1"], "kernel": masks["Dense_1"]["kernel"].T}}
    with pytest.raises(ValueError, match="Dense_1/kernel.*shape"):
        sp.rigl(optax.sgd(0.1), wrong).init(params)
    with pytest.raises(TypeError, match="Dense_0/kernel.*bool"):
        sp.rigl(optax.sgd(0.1), jax.tree.map(lambda m: m.astype(jnp.float32), masks))
    with pytest.raises(ValueError, match="regrow"):
        sp.dynamic_sparse(optax.sgd(0.1), masks, regrow="momentum")
    with pytest.raises(ValueError, match="key"):
        sp.dynamic_sparse(optax.sgd(0.1), masks, regrow="random")
    with pytest.raises(ValueError, match="drop_fraction"):
        sp.rigl(optax.sgd(0.1), masks, drop_fraction=1.5)
    with pytest.raises(ValueError, match="params"):
        tx = sp.rigl(optax.sgd(0.1), masks)
        tx.update(params, tx.init(params))
