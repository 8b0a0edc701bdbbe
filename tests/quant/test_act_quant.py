"""Activation fake quantization: values, clipped STE, Linen interception, NNX, QAT training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcomp import quant
from jaxcomp.quant import QuantConfig


def _ref(x, bits, axes, clip_ratio=1.0):
    """float64 fake quantization and the mask of unclipped codes."""
    top = 2 ** (bits - 1) - 1
    x = np.asarray(x, np.float64)
    amax = np.max(np.abs(x), axis=axes, keepdims=True) * clip_ratio
    s = np.where(amax > 0, amax / top, 1.0)
    v = np.round(x / s)
    return np.clip(v, -top, top) * s, np.abs(v) <= top


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_values_match_float64_reference(rng, bits, granularity):
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    x[0, 1] = 0.0  # an all-zero token stays exactly zero
    f = jax.jit(lambda x: quant.fake_quant_activation(x, bits, axis=(-1,), granularity=granularity))
    y = np.asarray(f(jnp.asarray(x)))
    ref, inside = _ref(x, bits, -1 if granularity == "token" else None)
    assert inside.all()  # absmax scales clip nothing
    # float32 division/multiplication against float64: a few ulps of the value
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y[0, 1], 0.0)
    levels = 2**bits - 1
    if granularity == "token":
        assert all(np.unique(y[i, j]).size <= levels for i in range(3) for j in range(5))
    else:
        assert np.unique(y).size <= levels


def test_int8_values_equal_quantize_activations(rng):
    x = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
    codes, scale = quant.quantize_activations(x)
    y = quant.fake_quant_activation(x, 8)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(codes.astype(jnp.float32) * scale))


def test_clipped_ste_gradient_against_definition(rng):
    x = jnp.asarray(rng.normal(size=(6, 24)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(6, 24)), jnp.float32)

    def loss(x):
        return jnp.sum(quant.fake_quant_activation(x, 4, clip_ratio=0.6) * g)

    grad = np.asarray(jax.jit(jax.grad(loss))(x))
    ref, inside = _ref(x, 4, -1, clip_ratio=0.6)
    assert 0 < inside.mean() < 1  # some entries clip
    np.testing.assert_array_equal(grad, np.where(inside, np.asarray(g), 0.0))
    y = np.asarray(quant.fake_quant_activation(x, 4, clip_ratio=0.6))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)


def test_bad_arguments_raise():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="bits"):
        quant.fake_quant_activation(x, 9)
    with pytest.raises(ValueError, match="granularity"):
        quant.fake_quant_activation(x, granularity="channel")
    with pytest.raises(ValueError, match="clip_ratio"):
        quant.fake_quant_activation(x, clip_ratio=0.0)
    with pytest.raises(ValueError, match="axis"):
        quant.fake_quant_activation(x, axis=2)
    with pytest.raises(TypeError, match="int32"):
        quant.fake_quant_activation(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="bits"), quant.fake_quant_activations(bits=1):
        pass


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


def _mlp_ref(params, x, bits, fq_inputs=True):
    """float64 forward with per-token fake-quantized Dense inputs."""
    h = np.asarray(x, np.float64)
    for i in range(3):
        p = params[f"Dense_{i}"]
        if fq_inputs:
            h = _ref(h, bits, -1)[0]
        h = h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
        if i < 2:
            h = np.maximum(h, 0)
    return h


def test_linen_context_matches_reference_and_w8a8_execution(rng):
    model = _MLP()
    x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    @jax.jit
    def qat_forward(params, x):
        with quant.fake_quant_activations(bits=8):
            return model.apply({"params": quant.fake_quantize_tree(params)}, x)

    y = np.asarray(qat_forward(params, x))
    fq_params = jax.tree.map(np.asarray, quant.fake_quantize_tree(params))
    np.testing.assert_allclose(y, _mlp_ref(fq_params, x, 8), rtol=1e-5, atol=1e-5)
    # W8A8 integer execution computes the same math (int32 accumulation, float rescale)
    qparams = quant.quantize_tree(params)
    w8a8 = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x, mode="w8a8"))
    y_w8a8 = np.asarray(w8a8(qparams, x))
    np.testing.assert_allclose(y, y_w8a8, rtol=1e-5, atol=1e-5)
    # and it differs from the float model, so the interception really happened
    y_float = np.asarray(jax.jit(model.apply)({"params": params}, x))
    assert np.abs(y - y_float).max() > 1e-4


def test_modules_regex_selects_layers(rng):
    model = _MLP()
    x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    with quant.fake_quant_activations(bits=4, modules=r"^Dense_0$"):
        y = jax.jit(model.apply)({"params": params}, x)
    h = _ref(x, 4, -1)[0]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.maximum(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    h = np.maximum(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
    ref = h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_einsum_and_conv_inputs(rng):
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    ein = nn.Einsum((6, 3, 4), "btc,chd->bthd")
    p = ein.init(jax.random.key(0), x)["params"]
    with quant.fake_quant_activations(bits=4):
        y = jax.jit(lambda p, x: ein.apply({"params": p}, x))(p, x)
    xq = _ref(x, 4, -1)[0]
    ref = np.einsum("btc,chd->bthd", xq, np.asarray(p["kernel"], np.float64))
    ref = ref + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)

    ein2 = nn.Einsum((5, 6, 2), "...tc,tcd->...d", use_bias=False)  # contraction over t and c
    p2 = ein2.init(jax.random.key(1), x)["params"]
    with quant.fake_quant_activations(bits=4):
        y2 = jax.jit(ein2.apply)({"params": p2}, x)
    xq2 = _ref(x, 4, (1, 2))[0]
    ref2 = np.einsum("btc,tcd->bd", xq2, np.asarray(p2["kernel"], np.float64))
    np.testing.assert_allclose(np.asarray(y2), ref2, rtol=1e-5, atol=1e-5)

    img = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    conv = nn.Conv(4, (3, 3), use_bias=False)
    pc = conv.init(jax.random.key(2), img)["params"]
    with quant.fake_quant_activations(bits=4, granularity="tensor"):
        yc = jax.jit(conv.apply)({"params": pc}, img)
    imgq = jnp.asarray(_ref(img, 4, None)[0], jnp.float32)
    np.testing.assert_allclose(
        np.asarray(yc), np.asarray(conv.apply({"params": pc}, imgq)), rtol=1e-5, atol=1e-5
    )


def test_nnx_linear_dot_general(rng):
    x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    layer = nnx.Linear(16, 8, dot_general=quant.fake_quant_dot_general(4), rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    ref = _ref(x, 4, -1)[0] @ np.asarray(layer.kernel[...], np.float64)
    ref = ref + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    # the gradient w.r.t. the input is the STE (all ones through an unclipped quantizer)
    gx = jax.grad(lambda x: layer(x).sum())(x)
    np.testing.assert_allclose(
        np.asarray(gx), np.broadcast_to(np.asarray(layer.kernel[...]).sum(1), x.shape), rtol=1e-5
    )


def test_qat_training_with_weights_and_activations_fake_quantized(rng, standard_promotion):
    model = _MLP()
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    y = jnp.asarray(np.argmax(np.asarray(x)[:, :4], axis=1), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.adam(1e-2)
    config = QuantConfig(bits=4)

    def loss_fn(params):
        with quant.fake_quant_activations(bits=8):
            logits = model.apply({"params": quant.fake_quantize_tree(params, default=config)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]
    assert step._cache_size() == 1  # no recompiles


def test_activation_fake_quant_on_the_device_mesh(rng):
    """Per-token scales need no communication: a batch sharded over 8 devices gives the
    single-device result, and the STE gradient reduces like any other."""
    from jaxcomp import train

    model = _MLP()
    x = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        with quant.fake_quant_activations(bits=4):
            return jnp.mean(model.apply({"params": quant.fake_quantize_tree(params)}, x) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    mesh = train.data_mesh()
    ref_value, ref_grad = value_and_grad(params, x)
    value, grad = value_and_grad(train.replicate(params, mesh), train.shard_batch(x, mesh))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 reduction order
