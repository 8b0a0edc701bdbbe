"""QAT on params trees: STE and LSQ fake quantization, export, masks and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcomp import quant, sparsity
from jaxcomp.quant import QuantConfig


def _params(rng):
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32),
            "bias": jnp.zeros(3, jnp.float32),
        },
    }


def test_ste_forward_and_clipped_gradient(rng):
    params = _params(rng)
    config = QuantConfig(bits=4, calibration="percentile", percentile=90.0)
    g = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)

    def loss(p):
        return jnp.sum(quant.fake_quantize_tree(p, default=config)["Dense_0"]["kernel"] * g)

    grads = jax.jit(jax.grad(loss))(params)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    s = np.percentile(np.abs(w), 90.0, axis=0, keepdims=True) / 7.0
    v = np.round(w / s)
    inside = (v >= -8) & (v <= 7)
    assert 0 < inside.mean() < 1  # some entries are clipped
    np.testing.assert_array_equal(np.asarray(grads["Dense_0"]["kernel"]), np.where(inside, g, 0))
    np.testing.assert_array_equal(np.asarray(grads["Dense_0"]["bias"]), 0)  # not used by the loss
    out = jax.jit(lambda p: quant.fake_quantize_tree(p, default=config))(params)
    np.testing.assert_allclose(
        np.asarray(out["Dense_0"]["kernel"]), np.clip(v, -8, 7) * s, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"])  # untouched


def test_ste_export_matches_forward(rng):
    params = _params(rng)
    config = QuantConfig(bits=3, group_size=4)
    fq = quant.fake_quantize_tree(params, default=config)
    deq = quant.dequantize_tree(quant.quantize_tree(params, default=config))
    for layer in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(fq[layer]["kernel"], deq[layer]["kernel"])


def test_lsq_scales_forward_gradients_and_export(rng):
    params = _params(rng)
    config = QuantConfig(bits=4)
    scales = quant.init_lsq_scales(params, default=config)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    assert scales["Dense_0"]["bias"] is None
    np.testing.assert_allclose(
        scales["Dense_0"]["kernel"], np.abs(w).max(0, keepdims=True) / 7, rtol=1e-6
    )
    scales = jax.tree.map(lambda s: s * 0.6, scales)  # so that some weights clip
    g = rng.normal(size=(16, 12)).astype(np.float32)

    def loss(p, s):
        out = quant.fake_quantize_tree(p, default=config, scales=s)["Dense_0"]["kernel"]
        return jnp.sum(out * jnp.asarray(g, jnp.float32))

    out = quant.fake_quantize_tree(params, default=config, scales=scales)["Dense_0"]["kernel"]
    s = np.asarray(scales["Dense_0"]["kernel"], np.float64)
    v = w / s
    np.testing.assert_allclose(np.asarray(out), np.round(np.clip(v, -8, 7)) * s, rtol=1e-6)
    dw, ds = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, scales)
    inside = (v >= -8) & (v <= 7)
    np.testing.assert_array_equal(np.asarray(dw["Dense_0"]["kernel"]), np.where(inside, g, 0))
    dv = np.where(v < -8, -8.0, np.where(v > 7, 7.0, np.round(v) - v))
    ref_ds = (g * dv).sum(0, keepdims=True) / np.sqrt(16 * 7)  # N = 16 weights per scale
    np.testing.assert_allclose(np.asarray(ds["Dense_0"]["kernel"]), ref_ds, rtol=1e-5, atol=1e-6)
    assert ds["Dense_0"]["bias"] is None
    q = quant.lsq_quantize_tree(params, scales, default=config)
    assert isinstance(q["Dense_0"]["kernel"], quant.QArray) and q["Dense_0"]["kernel"].packed
    np.testing.assert_array_equal(q["Dense_0"]["kernel"].dequantize(), out)


def test_lsq_rejects_grouped_configs(rng):
    params = _params(rng)
    with pytest.raises(ValueError, match="Dense_0/kernel: LSQ needs"):
        quant.init_lsq_scales(params, default=QuantConfig(bits=4, group_size=4))


def _mlp_loss(params, x, y, scales=None):
    p = quant.fake_quantize_tree(params, default=QuantConfig(bits=4), scales=scales)
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_qat_with_masks_and_adam_keeps_pruned_zeros(rng, standard_promotion):
    params = _params(rng)
    masks = sparsity.compute_masks(params, sparsity=0.5)
    params = sparsity.apply_masks(params, masks)
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=64), jnp.int32)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=1e-2), sparsity.keep_masks(masks))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    for layer in ("Dense_0", "Dense_1"):
        kernel, mask = np.asarray(params[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
        assert np.all(kernel[~mask] == 0.0)
        fq = quant.fake_quantize_tree(params, default=QuantConfig(bits=4))[layer]["kernel"]
        assert np.all(np.asarray(fq)[~mask] == 0.0)  # zeros stay zero in the quantized forward


def test_lsq_training_step_learns_scales(rng, standard_promotion):
    params = _params(rng)
    scales = quant.init_lsq_scales(params, default=QuantConfig(bits=4))
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=64), jnp.int32)
    train = {"params": params, "scales": scales}
    tx = optax.adam(1e-2)
    state = tx.init(train)

    @jax.jit
    def step(train, state):
        loss, grads = jax.value_and_grad(
            lambda t: _mlp_loss(t["params"], x, y, scales=t["scales"])
        )(train)
        updates, state = tx.update(grads, state, train)
        return optax.apply_updates(train, updates), state, loss

    first = None
    for _ in range(30):
        train, state, loss = step(train, state)
        first = float(loss) if first is None else first
    assert float(loss) < 0.8 * first
    s0, s1 = scales["Dense_0"]["kernel"], train["scales"]["Dense_0"]["kernel"]
    assert not np.allclose(s0, s1) and np.all(np.asarray(s1) > 0)
    assert train["scales"]["Dense_0"]["bias"] is None
