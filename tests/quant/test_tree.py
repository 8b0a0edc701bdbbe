"""quantize_tree / dequantize_tree on Linen params dicts and NNX states."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcomp.quant import QArray, QuantConfig, dequantize_tree, quantize, quantize_tree
from jaxcomp.rules import tree_nbytes


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(50, 16)(tokens).mean(axis=1)
        h = nn.relu(nn.Dense(64)(h))
        h = nn.LayerNorm()(h)
        return nn.Dense(10)(h)


class _NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        h = self.norm(jax.nn.relu(self.conv(x))).mean(axis=(1, 2))
        return self.out(h)


def _linen():
    model = _LinenMLP()
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    params = model.init(jax.random.key(0), tokens)["params"]
    return model, params, tokens


def _is_q(x):
    return isinstance(x, QArray)


def test_default_quantizes_only_kernels_and_round_trips():
    model, params, tokens = _linen()
    q = quantize_tree(params)
    assert isinstance(q["Dense_0"]["kernel"], QArray) and isinstance(q["Dense_1"]["kernel"], QArray)
    for untouched in (("Dense_0", "bias"), ("LayerNorm_0", "scale"), ("Embed_0", "embedding")):
        leaf = q[untouched[0]][untouched[1]]
        assert not isinstance(leaf, QArray)
        np.testing.assert_array_equal(
            np.asarray(leaf), np.asarray(params[untouched[0]][untouched[1]])
        )
    for name in ("Dense_0", "Dense_1"):
        ref = quantize(params[name]["kernel"], 8)
        got = q[name]["kernel"]
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(ref.scale))
    restored = dequantize_tree(q)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for name in ("Dense_0", "Dense_1"):
        w = np.asarray(params[name]["kernel"], np.float64)
        w_hat = np.asarray(restored[name]["kernel"], np.float64)
        assert np.all(np.abs(w - w_hat) <= np.asarray(q[name]["kernel"].scale) / 2 * (1 + 1e-5))
    y, y_hat = model.apply({"params": params}, tokens), model.apply({"params": restored}, tokens)
    # 8-bit per-channel weights: relative output error of order 2^-8.
    assert float(jnp.max(jnp.abs(y - y_hat))) <= 2e-2 * float(jnp.max(jnp.abs(y)))
    # Kernels [16, 64] and [64, 10]: float32 -> int8 codes + one float32 scale per column.
    saved = (16 * 64 * 4 - 16 * 64 - 64 * 4) + (64 * 10 * 4 - 64 * 10 - 10 * 4)
    assert tree_nbytes(q) == tree_nbytes(params) - saved


def test_rules_first_match_wins_none_leaves_alone_and_unused_reported():
    _, params, _ = _linen()
    rules = [
        (r"Dense_1/kernel", None),
        (r"Dense_\d/kernel", QuantConfig(bits=4, group_size=8)),
        (r"Embed_0/embedding", QuantConfig(bits=8, channel_axis=None)),
        (r"no_such_layer", QuantConfig(bits=2)),
    ]
    with pytest.warns(UserWarning, match="no_such_layer"):
        q = quantize_tree(params, rules)
    assert q["Dense_0"]["kernel"].bits == 4 and q["Dense_0"]["kernel"].group_size == 8
    assert q["Dense_0"]["kernel"].scale.shape == (2, 64)
    assert not isinstance(q["Dense_1"]["kernel"], QArray)
    assert q["Embed_0"]["embedding"].channel_axis is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_ruled = quantize_tree(params, rules[:1], default=None)
    assert not any(_is_q(x) for x in jax.tree.leaves(only_ruled, is_leaf=_is_q))
    again = quantize_tree(q)  # QArray leaves are kept as they are
    assert again["Dense_0"]["kernel"] is q["Dense_0"]["kernel"]


def test_nonfinite_leaf_named_or_skipped():
    _, params, _ = _linen()
    params = jax.tree.map(lambda x: x, params)
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="Dense_1/kernel.*NaN or Inf"):
        quantize_tree(params)
    with pytest.warns(UserWarning, match="Dense_1/kernel: holds NaN or Inf"):
        q = quantize_tree(params, skip_nonfinite=True)
    assert not isinstance(q["Dense_1"]["kernel"], QArray)
    assert isinstance(q["Dense_0"]["kernel"], QArray)


def test_config_errors_name_the_leaf():
    _, params, _ = _linen()
    with pytest.raises(ValueError, match="Dense_1/kernel: group_size 24 does not divide the 64"):
        quantize_tree(params, [(r"Dense_1/kernel", QuantConfig(bits=4, group_size=24))])
    with pytest.raises(TypeError, match="Dense_0/kernel: config is 4"):
        quantize_tree(params, [(r"Dense_0/kernel", 4)])
    with pytest.raises(TypeError, match="steps: quantize expects a floating-point"):
        quantize_tree({"steps": jnp.arange(4)}, [("steps", QuantConfig())])
    with pytest.raises(ValueError, match="Dense_0/kernel: channel_axis is 3"):
        quantize_tree(params, [(r"Dense_0/kernel", QuantConfig(channel_axis=3))])


def test_jit_matches_eager_and_bfloat16_round_trip():
    _, params, _ = _linen()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    rules = [
        (r"Dense_0/kernel", QuantConfig(bits=4, group_size=16, symmetric=False)),
        (r"Dense_1/kernel", QuantConfig(bits=8)),
    ]
    eager = quantize_tree(params, rules)
    jitted = jax.jit(lambda p: quantize_tree(p, rules))(params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored = jax.jit(dequantize_tree)(jitted)
    assert jax.tree.map(lambda x: x.dtype, restored) == jax.tree.map(lambda x: x.dtype, params)
    np.testing.assert_array_equal(
        np.asarray(restored["Dense_1"]["kernel"]),
        np.asarray(eager["Dense_1"]["kernel"].dequantize()),
    )


def test_nnx_state_round_trip():
    model = _NNXModel(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    y = model(x)
    state = nnx.state(model, nnx.Param)
    q = quantize_tree(state, [(r"conv/kernel", QuantConfig(bits=8, group_size=9))])
    conv, out = q["conv"]["kernel"].get_value(), q["out"]["kernel"].get_value()
    assert isinstance(conv, QArray) and conv.scale.shape == (3, 8)  # 3*3*3 rows in groups of 9
    assert isinstance(out, QArray) and out.shape == (8, 5)
    assert not isinstance(q["norm"]["scale"].get_value(), QArray)
    assert tree_nbytes(q) < tree_nbytes(state)
    restored = dequantize_tree(q)
    nnx.update(model, restored)
    y_hat = model(x)
    assert y_hat.shape == y.shape
    assert float(jnp.max(jnp.abs(y - y_hat))) <= 2e-2 * float(jnp.max(jnp.abs(y)))
    assert float(jnp.max(jnp.abs(y - y_hat))) > 0.0  # the weights really went through int8
