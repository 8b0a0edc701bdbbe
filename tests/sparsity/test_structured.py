"""Neuron removal: the shrunk MLP / transformer MLP computes what the masked one computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp.sparsity as sp
from jaxcomp.models import GPT, MLP, GPTConfig, init_params

PAIRS = [("Dense_0", "Dense_1"), ("Dense_1", "Dense_2")]


def _perturbed(params, rng):
    """Non-zero biases, so that cutting a neuron must remove its bias too."""
    return jax.tree.map(
        lambda p: p + jnp.asarray(rng.standard_normal(p.shape) * 0.1, p.dtype), params
    )


def test_select_neurons_matches_numpy_norms(rng):
    params = _perturbed(init_params(MLP(features=(32, 24), num_classes=5), (10,)), rng)
    keep = sp.select_neurons(params, PAIRS, 0.4)
    for producer, consumer in PAIRS:
        pk = np.asarray(params[producer]["kernel"], np.float64)
        ck = np.asarray(params[consumer]["kernel"], np.float64)
        scores = np.sqrt((pk**2).sum(0)) * np.sqrt((ck**2).sum(1))
        h = pk.shape[1]
        n_keep = h - round(0.4 * h)
        want = np.zeros(h, bool)
        want[np.argsort(-scores, kind="stable")[:n_keep]] = True
        np.testing.assert_array_equal(keep[producer], want)
        np.testing.assert_allclose(sp.neuron_scores(params, (producer, consumer)), scores)


def test_shrunk_mlp_equals_masked_mlp(rng):
    model = MLP(features=(32, 24), num_classes=5)
    params = _perturbed(init_params(model, (10,)), rng)
    keep = sp.select_neurons(params, PAIRS, 0.5)
    masked = sp.apply_masks(params, sp.neuron_masks(params, PAIRS, keep))
    small, widths = sp.remove_neurons(params, PAIRS, keep)
    assert widths == {"Dense_0": 16, "Dense_1": 12}
    assert small["Dense_0"]["kernel"].shape == (10, 16)
    assert small["Dense_1"]["kernel"].shape == (16, 12)
    assert small["Dense_2"]["kernel"].shape == (12, 5)
    x = jnp.asarray(rng.standard_normal((7, 10)), jnp.float32)
    small_model = MLP(features=(widths["Dense_0"], widths["Dense_1"]), num_classes=5)
    want = jax.jit(model.apply)({"params": masked}, x)
    got = jax.jit(small_model.apply)({"params": small}, x)
    # same products, dropping exact zeros; only the summation order differs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the kept entries are copied, not recomputed
    idx = np.flatnonzero(keep["Dense_0"])
    np.testing.assert_array_equal(small["Dense_0"]["kernel"], params["Dense_0"]["kernel"][:, idx])
    np.testing.assert_array_equal(small["Dense_0"]["bias"], params["Dense_0"]["bias"][idx])


def test_shrunk_transformer_mlp_equals_masked(rng):
    config = GPTConfig(vocab_size=11, max_len=8, n_layer=2, n_head=2, d_model=8, d_ff=16)
    tokens = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
    params = _perturbed(GPT(config).init(jax.random.key(0), tokens)["params"], rng)
    pairs = [(f"block_{i}/mlp/fc", f"block_{i}/mlp/proj") for i in range(2)]
    keep = sp.select_neurons(params, pairs, 0.25)
    masked = sp.apply_masks(params, sp.neuron_masks(params, pairs, keep))
    small, widths = sp.remove_neurons(params, pairs, keep)
    assert set(widths.values()) == {12}
    small_config = GPTConfig(vocab_size=11, max_len=8, n_layer=2, n_head=2, d_model=8, d_ff=12)
    want = GPT(config).apply({"params": masked}, tokens)
    got = GPT(small_config).apply({"params": small}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    n_small = sum(x.size for x in jax.tree.leaves(small))
    n_big = sum(x.size for x in jax.tree.leaves(params))
    assert n_big - n_small == 2 * 4 * (8 + 1 + 8)


def test_bad_input(rng):
    params = init_params(MLP(features=(6, 4), num_classes=3), (5,))
    keep = {"Dense_0": np.ones(6, bool), "Dense_1": np.ones(4, bool)}
    with pytest.raises(ValueError, match="'Dense_7'"):
        sp.remove_neurons(params, [("Dense_7", "Dense_1")], keep)
    with pytest.raises(ValueError, match="consecutive"):
        sp.remove_neurons(params, [("Dense_0", "Dense_2")], keep)
    with pytest.raises(ValueError, match=r"keep\['Dense_0'\].*\(6,\)"):
        sp.remove_neurons(params, [("Dense_0", "Dense_1")], {"Dense_0": np.ones(5, bool)})
    with pytest.raises(ValueError, match="every neuron"):
        sp.remove_neurons(params, [("Dense_0", "Dense_1")], {"Dense_0": np.zeros(6, bool)})
    with pytest.raises(ValueError, match="sparsity"):
        sp.select_neurons(params, PAIRS, 1.0)
