"""Scale folding, SmoothQuant and model-level AWQ on Linen (GPT, BERT) and NNX models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcomp import ptq, quant
from jaxcomp.models import GPT, BertConfig, BertEncoder, GPTConfig, bert_folds, gpt_folds

CONFIG = GPTConfig(vocab_size=64, max_len=16, n_layer=2, n_head=2, d_model=32, d_ff=64)


def _gpt(outliers: bool = True):
    model = GPT(CONFIG)
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, CONFIG.vocab_size)
    params = model.init(jax.random.key(1), tokens)["params"]
    if outliers:  # a few large input channels, as LLM activations have
        for i in range(CONFIG.n_layer):
            ln = params[f"block_{i}"]["LayerNorm_0"]
            ln["scale"] = ln["scale"].at[:3].set(25.0)
    return model, params, tokens


def test_folds_preserve_the_float_function(rng):
    model, params, tokens = _gpt()
    folded = params
    leaves = ptq._fold.leaves_by_path(params)
    for fold in gpt_folds(CONFIG):
        k = leaves[fold.layers[0]].shape[0]
        folded = ptq.fold_scales(folded, fold, rng.uniform(0.2, 5.0, k).astype(np.float32))
    ref = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(model.apply({"params": folded}, tokens), ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(
        folded["block_0"]["attn"]["query"]["kernel"], params["block_0"]["attn"]["query"]["kernel"]
    )

    bert = BertEncoder(
        BertConfig(vocab_size=50, max_len=16, n_layers=2, n_heads=2, d_model=16, d_ff=32)
    )
    ids = jax.random.randint(jax.random.key(2), (3, 10), 0, 50)
    mask = jnp.ones((3, 10), bool)
    bparams = bert.init(jax.random.key(3), ids, mask)["params"]
    bfolded = bparams
    for fold in bert_folds(bert.config):
        bfolded = ptq.fold_scales(bfolded, fold, rng.uniform(0.2, 5.0, 16).astype(np.float32))
    np.testing.assert_allclose(
        bert.apply({"params": bfolded}, ids, mask),
        bert.apply({"params": bparams}, ids, mask),
        rtol=1e-4,
        atol=1e-5,
    )


def test_smoothquant_scales_match_numpy(rng):
    a, w = rng.uniform(0, 30, 16), rng.uniform(0, 2, 16)
    a[0] = 0.0
    for alpha in (0.0, 0.5, 0.8):
        ref = np.maximum(a, 1e-5) ** alpha / np.maximum(w, 1e-5) ** (1 - alpha)
        np.testing.assert_allclose(ptq.smoothquant_scales(a, w, alpha), ref, rtol=1e-5)


def test_smoothquant_model_scales_and_w8a8_error():
    model, params, tokens = _gpt()
    smooth = ptq.smoothquant_model(model, params, [tokens], folds=gpt_folds(CONFIG), alpha=0.5)
    ref = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(model.apply({"params": smooth}, tokens), ref, rtol=1e-4, atol=1e-4)
    # the first fold's scales from the LayerNorm output, computed by hand in float64
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    x = np.asarray(state["intermediates"]["embed"][0], np.float64)
    ln = params["block_0"]["LayerNorm_0"]
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    act = np.abs(xhat * np.asarray(ln["scale"]) + np.asarray(ln["bias"])).reshape(-1, 32).max(0)
    attn = params["block_0"]["attn"]
    wmax = np.concatenate([np.abs(attn[n]["kernel"]) for n in ("query", "key", "value")], 1).max(1)
    s = act**0.5 / wmax**0.5
    np.testing.assert_allclose(
        smooth["block_0"]["LayerNorm_0"]["scale"], np.asarray(ln["scale"]) / s, rtol=1e-3
    )
    errors = {}
    for name, p in (("plain", params), ("smooth", smooth)):
        out = quant.quantized_apply(model, {"params": quant.quantize_tree(p)}, tokens, mode="w8a8")
        errors[name] = float(jnp.mean((out - ref) ** 2))
    assert errors["smooth"] < 0.75 * errors["plain"], errors  # measured 0.61x


def test_awq_model_beats_rtn_on_linen_gpt():
    model, params, tokens = _gpt()
    config = ptq.AWQConfig(bits=3, group_size=None)
    q = ptq.awq_model(model, params, [tokens], folds=gpt_folds(CONFIG), default=config)
    kernels = [
        p
        for p, x in ptq._fold.leaves_by_path(params).items()
        if x.ndim == 2 and p.endswith("kernel")
    ]
    flat = dict(
        jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda x: isinstance(x, quant.QArray))[0]
    )
    flat = {"/".join(k.key for k in p): x for p, x in flat.items()}
    assert all(isinstance(flat[p], quant.QArray) and flat[p].bits == 3 for p in kernels)
    ref = model.apply({"params": params}, tokens)
    awq_err = jnp.mean((model.apply({"params": quant.dequantize_tree(q)}, tokens) - ref) ** 2)
    rtn = quant.quantize_tree(params, default=quant.QuantConfig(bits=3))
    rtn_err = jnp.mean((model.apply({"params": quant.dequantize_tree(rtn)}, tokens) - ref) ** 2)
    assert awq_err < 0.7 * rtn_err, (awq_err, rtn_err)
    out = quant.quantized_apply(model, {"params": q}, tokens, mode="weight_only")
    assert bool(jnp.all(jnp.isfinite(out)))


class _NormDense(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.fc = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.norm(x))


def test_awq_and_smoothquant_on_nnx():
    net = _NormDense(nnx.Rngs(0))
    net.norm.scale[...] = net.norm.scale[...].at[:2].set(30.0)
    graphdef, state = nnx.split(net)
    x = jax.random.normal(jax.random.key(1), (64, 16))
    folds = [ptq.Fold("norm", ("fc/kernel",))]
    smooth = ptq.smoothquant_model(graphdef, state, [x], folds=folds)
    np.testing.assert_allclose(nnx.merge(graphdef, smooth)(x), net(x), rtol=1e-4, atol=1e-5)
    config = ptq.AWQConfig(bits=3, group_size=None)
    q = ptq.awq_model(graphdef, state, [x], folds=folds, default=config)
    deq = nnx.merge(graphdef, quant.dequantize_tree(q))(x)
    rtn = nnx.merge(
        graphdef,
        quant.dequantize_tree(quant.quantize_tree(state, default=quant.QuantConfig(bits=3))),
    )(x)
    assert jnp.mean((deq - net(x)) ** 2) < jnp.mean((rtn - net(x)) ** 2)


class _TwoBranch(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(x)
        return nn.Dense(4, name="a")(h) + nn.Dense(4, name="b")(h)


def test_bad_folds_and_configs():
    model = _TwoBranch()
    x = jax.random.normal(jax.random.key(0), (8, 16))
    params = model.init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match="Fold.prev 'nope' names no norm"):
        ptq.smoothquant_model(model, params, [x], folds=[ptq.Fold("nope", ("a/kernel",))])
    with pytest.raises(ValueError, match="Fold layer 'c/kernel' is not a leaf"):
        ptq.awq_model(model, params, [x], folds=[ptq.Fold("ln", ("c/kernel",))])
    with pytest.raises(ValueError, match=r"Fold layer 'a/kernel' has shape \(16, 4\); expected"):
        ptq.fold_scales(params, ptq.Fold("a", ("a/kernel",)), jnp.ones(4))
    with pytest.raises(ValueError, match="a/kernel is in the folds of both"):
        ptq.awq_model(model, params, [x], folds=[ptq.Fold("ln", ("a/kernel",))] * 2)
    with pytest.raises(ValueError, match="alpha is 1.5"):
        ptq.smoothquant_model(model, params, [x], folds=[], alpha=1.5)
    with pytest.raises(ValueError, match="a/kernel: group_size 32 does not divide the 16"):
        ptq.awq_model(model, params, [x], folds=[], default=ptq.AWQConfig(group_size=32))
    mixed = [("a/kernel", ptq.AWQConfig(bits=4, group_size=8))]
    with pytest.raises(ValueError, match="different configs"):
        ptq.awq_model(
            model,
            params,
            [x],
            folds=[ptq.Fold("ln", ("a/kernel", "b/kernel"))],
            rules=mixed,
            default=ptq.AWQConfig(bits=3, group_size=8),
        )
    with pytest.raises(TypeError, match=r"expected one of \[.AWQConfig.\] or None"):
        ptq.awq_model(model, params, [x], folds=[], default=ptq.GPTQConfig())
    with pytest.raises(ValueError, match="AWQConfig.grid is 0"):
        ptq.AWQConfig(grid=0)
    with pytest.raises(TypeError, match="expected jaxcomp.ptq.Fold"):
        ptq.awq_model(model, params, [x], folds=[("ln", "a/kernel")])


def test_layers_without_tokens_fall_back_with_a_warning():
    model = _TwoBranch()
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    params = model.init(jax.random.key(1), x)["params"]
    none = (x, jnp.zeros((2, 8), bool))
    folds = [ptq.Fold("ln", ("a/kernel", "b/kernel"))]
    with pytest.warns(UserWarning, match=r"ln: no calibration tokens reached"):
        smooth = ptq.smoothquant_model(model, params, [none], folds=folds)
    np.testing.assert_array_equal(smooth["ln"]["scale"], params["ln"]["scale"])
    config = ptq.AWQConfig(bits=4, group_size=None)
    with pytest.warns(UserWarning) as record:
        q = ptq.awq_model(model, params, [none], folds=folds, default=config)
    assert sorted(str(w.message).split(":")[0] for w in record) == ["a/kernel", "b/kernel", "ln"]
    assert all("round-to-nearest" in str(w.message) for w in record[1:])
    np.testing.assert_array_equal(
        q["a"]["kernel"].codes, quant.quantize(params["a"]["kernel"], 4).codes
    )


def test_capture_accepts_an_apply_function():
    model = _TwoBranch()
    x = jax.random.normal(jax.random.key(0), (8, 16))
    params = model.init(jax.random.key(1), x)["params"]

    def apply_fn(p, batch):
        return model.apply({"params": p}, batch["x"])

    stats, order = ptq.capture_stats(apply_fn, params, [{"x": x}])
    assert order == ["a/kernel", "b/kernel"] and int(stats["a/kernel"].count) == 8
    with pytest.raises(TypeError, match="model is int; expected a flax.linen.Module"):
        ptq.capture_stats(3, params, [x])


class _ConvHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc")(nn.Conv(8, (3, 3), name="conv")(x).mean((1, 2)))


def test_awq_names_a_ruled_kernel_it_cannot_quantize():
    model = _ConvHead()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = model.init(jax.random.key(1), x)["params"]
    config = ptq.AWQConfig(bits=4, group_size=None)
    with pytest.raises(ValueError, match=r"conv/kernel: AWQ needs a Dense kernel \[in, out\]"):
        ptq.awq_model(model, params, [x], folds=[], default=config)
    q = ptq.awq_model(model, params, [x], folds=[], rules=[("conv", None)], default=config)
    assert isinstance(q["fc"]["kernel"], quant.QArray) and q["conv"]["kernel"].ndim == 4
