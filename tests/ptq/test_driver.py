"""compress_model: parallel and sequential modes on Linen and NNX MLPs, rules and fallbacks."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcomp import ptq, quant
from jaxcomp.models import MLP, NNXMLP, init_params


@pytest.fixture(scope="module")
def linen():
    model = MLP((16, 16), 8)
    params = init_params(model, (12,))
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(32, 12)).astype(np.float32) for _ in range(2)]
    return model, params, batches


def _hessian(h):
    h = np.asarray(h, np.float32)
    return 2 * h.T @ h / len(h)


def _hidden(params, x, upto):
    h = np.concatenate(x)
    for i in range(upto):
        layer = params[f"Dense_{i}"]
        h = np.maximum(h @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"]), 0)
    return h


def _dq(leaf):
    return np.asarray(leaf.dequantize() if isinstance(leaf, quant.QArray) else leaf)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_linen_gptq_modes(linen, mode):
    model, params, batches = linen
    config = ptq.GPTQConfig(bits=3, group_size=4)
    out, masks = ptq.compress_model(
        model, params, batches, rules=[("Dense_2", None)], default=config, mode=mode
    )
    assert isinstance(out["Dense_0"]["kernel"], quant.QArray)
    assert isinstance(out["Dense_1"]["kernel"], quant.QArray)
    np.testing.assert_array_equal(out["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    assert jax.tree.leaves(masks) == []
    # The second layer's Hessian: from the float model (parallel) or from the model whose
    # first layer is already quantized (sequential: error propagation).
    first = dict(params, Dense_0=dict(params["Dense_0"], kernel=_dq(out["Dense_0"]["kernel"])))
    h1 = _hessian(_hidden(params if mode == "parallel" else first, batches, 1))
    want = ptq.gptq(params["Dense_1"]["kernel"], h1, bits=3, group_size=4)
    got = out["Dense_1"]["kernel"]
    assert np.mean(np.asarray(got.grid_values()) != np.asarray(want.grid_values())) <= 0.01
    want0 = ptq.gptq(
        params["Dense_0"]["kernel"], _hessian(np.concatenate(batches)), bits=3, group_size=4
    )
    np.testing.assert_array_equal(out["Dense_0"]["kernel"].codes, want0.codes)


def test_sequential_differs_from_parallel(linen):
    model, params, batches = linen
    kw = dict(default=ptq.GPTQConfig(bits=2))
    par, _ = ptq.compress_model(model, params, batches, mode="parallel", **kw)
    seq, _ = ptq.compress_model(model, params, batches, mode="sequential", **kw)
    np.testing.assert_array_equal(par["Dense_0"]["kernel"].codes, seq["Dense_0"]["kernel"].codes)
    assert not np.array_equal(_dq(par["Dense_2"]["kernel"]), _dq(seq["Dense_2"]["kernel"]))


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_nnx_sparsegpt_and_wanda(mode):
    model = NNXMLP(12, (16,), 8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(32, 12)).astype(np.float32)]
    rules = [("hidden/0", ptq.SparseGPTConfig(pattern="2:4")), ("head", ptq.WandaConfig(0.5))]
    out, masks = ptq.compress_model(graphdef, state, batches, rules=rules, default=None, mode=mode)
    x = batches[0]
    w0 = np.asarray(model.hidden[0].kernel[...])
    want0, keep0 = ptq.sparsegpt(w0, _hessian(x), pattern="2:4")
    np.testing.assert_array_equal(masks["hidden"][0]["kernel"][...], keep0)
    np.testing.assert_allclose(out["hidden"][0]["kernel"][...], want0, rtol=1e-6, atol=1e-6)
    w_in = want0 if mode == "sequential" else w0
    hidden = np.maximum(x @ w_in + np.asarray(model.hidden[0].bias[...]), 0)
    want1, keep1 = ptq.wanda(
        model.head.kernel[...], np.sqrt((hidden.astype(np.float64) ** 2).sum(0)), sparsity=0.5
    )
    np.testing.assert_array_equal(masks["head"]["kernel"][...], keep1)
    np.testing.assert_array_equal(np.asarray(keep1).sum(0), 8)
    # The compressed state still runs.
    y = nnx.merge(graphdef, out)(x)
    assert y.shape == (32, 8) and np.all(np.isfinite(y))


def test_layer_without_tokens_falls_back(linen):
    model, params, batches = linen
    masked = [(x, np.zeros(len(x), bool)) for x in batches]
    with pytest.warns(UserWarning, match="Dense_0/kernel: no calibration tokens.*round-to-nearest"):
        out, _ = ptq.compress_model(model, params, masked, rules=[("Dense_[12]", None)])
    want = quant.quantize(params["Dense_0"]["kernel"], 4)
    np.testing.assert_array_equal(out["Dense_0"]["kernel"].codes, want.codes)


def test_bad_arguments(linen):
    model, params, batches = linen
    with pytest.raises(ValueError, match="mode is 'both'"):
        ptq.compress_model(model, params, batches, mode="both")
    with pytest.raises(TypeError, match="Dense_0/kernel: config is 4"):
        ptq.compress_model(model, params, batches, rules=[("Dense_0", 4)])
    with pytest.raises(TypeError, match="pass a list"):
        ptq.compress_model(model, params, iter(batches), mode="sequential")
