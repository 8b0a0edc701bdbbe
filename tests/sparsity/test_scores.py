"""Movement and Wanda scores against float64 numpy, and their use in compute_masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcomp.sparsity as sp


def test_track_movement_sums_minus_w_g_over_steps(rng):
    params = {
        "k": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
        "b": jnp.zeros(4, jnp.float32),
    }
    x = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)

    def loss(p):
        return jnp.mean(jnp.tanh(x @ p["k"] + p["b"]) ** 2)

    tx = optax.chain(sp.track_movement(), optax.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, g

    want = {k: np.zeros(v.shape) for k, v in params.items()}
    for _ in range(5):
        before = params
        params, state, g = step(params, state)
        for k in want:
            want[k] -= np.asarray(before[k], np.float64) * np.asarray(g[k], np.float64)
    for k in want:
        # float32 products summed over 5 steps: a few ulps of the largest term
        np.testing.assert_allclose(state[0].scores[k], want[k], rtol=1e-5, atol=1e-7)
    masks = sp.compute_masks(params, sparsity=0.5, scores=state[0].scores)
    order = np.argsort(-want["k"].ravel(), kind="stable")[:12]
    expect = np.zeros(24, bool)
    expect[order] = True
    np.testing.assert_array_equal(masks["k"].ravel(), expect)


def test_movement_scores_checks_the_tree(rng):
    with pytest.raises(ValueError, match="'w'"):
        sp.movement_scores({"w": jnp.ones(2)}, {"v": jnp.ones(2)})


def test_wanda_masks_match_numpy_per_output_column(rng):
    kernel = rng.standard_normal((12, 5)).astype(np.float32)
    x = rng.standard_normal((3, 7, 12)).astype(np.float32) * np.linspace(0.1, 3, 12)
    norms = np.sqrt((x.astype(np.float64).reshape(-1, 12) ** 2).sum(0))
    np.testing.assert_allclose(sp.input_norms(x), norms, rtol=1e-6)
    scores = jax.jit(sp.wanda_scores)(kernel, sp.input_norms(x))
    want = np.abs(kernel.astype(np.float64)) * norms[:, None]
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    params = {"Dense_0": {"kernel": jnp.asarray(kernel)}}
    masks = sp.compute_masks(
        params, sparsity=0.5, scores={"Dense_0": {"kernel": scores}}, scope="output"
    )
    expect = np.zeros((12, 5), bool)
    for col in range(5):
        expect[np.argsort(-want[:, col], kind="stable")[:6], col] = True
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"], expect)
    with pytest.raises(ValueError, match=r"\(12,\)"):
        sp.wanda_scores(kernel, norms[:5])
