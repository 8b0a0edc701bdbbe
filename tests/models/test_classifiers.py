"""Reference classifiers: shapes, the NNX twin, and rebuilding from a stored config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcomp.models import CNN, HINTON_SIZES, MLP, NNXMLP, build_model, init_params


def _numpy_mlp(params, x):
    """float64 forward of the Linen MLP's params."""
    h = x.reshape(len(x), -1).astype(np.float64)
    names = sorted(params, key=lambda k: int(k.split("_")[1]))
    for i, name in enumerate(names):
        h = h @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"])
        if i < len(names) - 1:
            h = np.maximum(h, 0)
    return h


def test_mlp_matches_numpy_and_hinton_sizes(rng):
    model = MLP(features=HINTON_SIZES["small"], num_classes=10)
    params = init_params(model, (8, 8, 1), seed=0)
    assert params["Dense_0"]["kernel"].shape == (64, 300)
    assert params["Dense_2"]["kernel"].shape == (300, 10)
    x = rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(out, _numpy_mlp(params, x), rtol=1e-4, atol=1e-4)


def test_dropout_only_in_training():
    model = MLP(features=(16,), dropout_rate=0.5)
    params = init_params(model, (4,))
    x = jnp.ones((3, 4))
    a = model.apply({"params": params}, x)
    b = model.apply({"params": params}, x)
    c = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_cnn_shapes():
    params = init_params(CNN(), (28, 28, 1))
    assert params["Conv_0"]["kernel"].shape == (3, 3, 1, 32)
    assert params["Dense_0"]["kernel"].shape == (7 * 7 * 64, 128)
    out = CNN().apply({"params": params}, jnp.zeros((2, 28, 28, 1)))
    assert out.shape == (2, 10)


def test_nnx_mlp_matches_linen_with_same_weights(rng):
    linen = MLP(features=(12, 6), num_classes=3)
    params = init_params(linen, (5,))
    model = NNXMLP(5, (12, 6), 3, rngs=nnx.Rngs(0))
    for i, layer in enumerate([*model.hidden, model.head]):
        layer.kernel[...] = params[f"Dense_{i}"]["kernel"]
        layer.bias[...] = params[f"Dense_{i}"]["bias"]
    x = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(model(x), linen.apply({"params": params}, x), rtol=1e-6)


def test_build_model_roundtrip_and_errors():
    model = build_model({"kind": "mlp", "features": [8, 8], "num_classes": 4})
    assert model == MLP(features=(8, 8), num_classes=4)
    assert build_model({"kind": "cnn", "channels": [4, 8]}) == CNN(channels=(4, 8))
    with pytest.raises(ValueError, match="model kind 'resnet' is unknown"):
        build_model({"kind": "resnet"})
