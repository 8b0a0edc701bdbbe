"""Mask trees: apply, combine, invert, counts, structure checks, Linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcomp.sparsity as sp


def _params(rng):
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(5), jnp.float32),
        },
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16)},
        "codes": jnp.asarray(rng.integers(-5, 5, (4, 4)), jnp.int8),
    }


def _masks(rng, params):
    return {
        "Dense_0": {"kernel": jnp.asarray(rng.random((6, 5)) < 0.5), "bias": None},
        "Dense_1": {"kernel": jnp.asarray(rng.random((5, 3)) < 0.5)},
        "codes": jnp.asarray(rng.random((4, 4)) < 0.5),
    }


def test_apply_masks_zeroes_pruned_and_keeps_dtype(rng):
    params = _params(rng)
    masks = _masks(rng, params)
    out = jax.jit(sp.apply_masks)(params, masks)
    for path in (("Dense_0", "kernel"), ("Dense_1", "kernel")):
        p, m, o = params[path[0]][path[1]], masks[path[0]][path[1]], out[path[0]][path[1]]
        assert o.dtype == p.dtype
        expected = np.where(np.asarray(m), np.asarray(p, np.float64), 0.0)
        np.testing.assert_array_equal(np.asarray(o, np.float64), expected)
    assert out["codes"].dtype == jnp.int8
    np.testing.assert_array_equal(
        np.asarray(out["codes"]), np.where(np.asarray(masks["codes"]), params["codes"], 0)
    )
    np.testing.assert_array_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_combine_invert_and_counts_match_numpy(rng):
    params = _params(rng)
    a, b = _masks(rng, params), _masks(rng, params)
    b["Dense_1"]["kernel"] = None
    both = jax.jit(sp.combine_masks)(a, b)
    np.testing.assert_array_equal(
        both["Dense_0"]["kernel"], np.asarray(a["Dense_0"]["kernel"]) & b["Dense_0"]["kernel"]
    )
    np.testing.assert_array_equal(both["Dense_1"]["kernel"], a["Dense_1"]["kernel"])
    assert both["Dense_0"]["bias"] is None
    swapped = sp.combine_masks(b, a)
    np.testing.assert_array_equal(swapped["Dense_1"]["kernel"], a["Dense_1"]["kernel"])
    inverted = jax.jit(sp.invert_masks)(a)
    np.testing.assert_array_equal(inverted["codes"], ~np.asarray(a["codes"]))
    assert inverted["Dense_0"]["bias"] is None
    counts = jax.jit(sp.mask_counts)(a)
    assert counts["Dense_0"]["bias"] is None
    assert int(counts["codes"]) == int(np.sum(np.asarray(a["codes"])))
    expected = sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(a))
    assert int(jax.jit(sp.count_nonzero)(a)) == expected
    expected = sum(int(np.count_nonzero(np.asarray(p))) for p in jax.tree.leaves(params))
    assert int(sp.count_nonzero(params)) == expected


def test_mismatched_masks_name_the_leaf(rng):
    params = _params(rng)
    masks = _masks(rng, params)
    del masks["Dense_1"]
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sp.apply_masks(params, masks)
    masks = _masks(rng, params)
    masks["Dense_1"]["kernel"] = jnp.ones((3, 5), jnp.bool_)
    with pytest.raises(ValueError, match=r"Dense_1/kernel.*\(3, 5\).*\(5, 3\)"):
        sp.apply_masks(params, masks)
    masks = _masks(rng, params)
    masks["codes"] = jnp.ones((4, 4), jnp.float32)
    with pytest.raises(TypeError, match="codes.*float32"):
        sp.apply_masks(params, masks)
    other = _masks(rng, params)
    other["extra"] = None
    with pytest.raises(ValueError, match="masks b do not match masks a at leaf 'extra'"):
        sp.combine_masks(_masks(rng, params), other)


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.down = nnx.Linear(16, 4, rngs=rngs)


def test_nnx_state_round_trip():
    model = _Model(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    masks = sp.compute_masks(state, sparsity=0.75)
    assert isinstance(masks, nnx.State)
    pruned = jax.jit(sp.apply_masks)(state, masks)
    assert isinstance(pruned, nnx.State)
    nnx.update(model, pruned)
    kernel = np.asarray(model.up.kernel[...])
    assert np.count_nonzero(kernel) == 128 - 96
    np.testing.assert_array_equal(kernel != 0, np.asarray(masks["up"]["kernel"][...]))
    np.testing.assert_array_equal(model.up.bias[...], state["up"]["bias"][...])
    assert int(sp.count_nonzero(masks)) == 32 + 16
    plain = {"up": {"kernel": masks["up"]["kernel"][...]}}
    with pytest.raises(ValueError, match="masks"):
        sp.apply_masks(state, plain)
