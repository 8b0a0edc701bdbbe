"""W8A8 / fp8 / weight-only dot_general and running unmodified Flax models on QArray params."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import quant

DENSE_DIMS = (((1,), (0,)), ((), ()))


def _ref_act(x):
    """float32 numpy reference of per-token int8 activation quantization (same arithmetic)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(x / s), -127, 127).astype(np.int64), s


def _ref_w8a8(x, codes, w_scale):
    """float64 reference: exact integer accumulation, then s_a * s_w rescale."""
    a, s_a = _ref_act(x)
    acc = a @ np.asarray(codes, np.int64)
    return acc, acc * s_a.astype(np.float64) * np.asarray(w_scale, np.float64)


def _int8_dot_in_hlo(text: str) -> bool:
    """True if the compiled HLO holds a dot with two s8 operands and an s32 result, or the
    native AMX W8A8 kernel (tests/quant/test_native.py checks that one on its own)."""
    if 'custom_call_target="jaxcomp_w8a8_matmul"' in text:
        return True
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))
    for out, a, b in re.findall(r"= (\w+)\[[^\]]*\]\{?[^ ]* dot\(%([\w.\-]+), %([\w.\-]+)\)", text):
        if out == "s32" and types.get(a) == "s8" and types.get(b) == "s8":
            return True
    return False


def test_quantize_activations_matches_reference(rng):
    x = rng.normal(size=(5, 33)).astype(np.float32)
    x[2] = 0.0  # all-zero token: scale 1, exact zeros
    codes, scale = jax.jit(quant.quantize_activations)(x)
    ref_codes, ref_scale = _ref_act(x)
    assert codes.dtype == jnp.int8 and scale.shape == (5, 1)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    # XLA may turn amax / 127 into amax * (1 / 127): 1 ulp apart at most
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=2.0**-23, atol=0)
    assert np.all(np.asarray(codes)[2] == 0) and float(scale[2, 0]) == 1.0


def test_w8a8_exact_integer_accumulation_and_rescale(rng):
    x = rng.normal(size=(7, 96)).astype(np.float32)
    w = rng.normal(size=(96, 40)).astype(np.float32)
    q = quant.quantize(w, bits=8)
    y = jax.jit(quant.w8a8_dot_general, static_argnums=2)(x, q, DENSE_DIMS)
    acc, y_ref = _ref_w8a8(x, q.codes, q.scale)
    # the int32 accumulator itself is exact: same codes, integer dot
    a = quant.quantize_activations(x)[0]
    acc_jax = jax.lax.dot_general(a, q.codes, DENSE_DIMS, preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(acc_jax), acc)
    # |acc| < 2^24, so float32(acc) is exact; two float32 products round by <= 2 ulp
    assert np.abs(acc).max() < 2**24
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=3 * 2.0**-23, atol=0)


def test_w8a8_error_within_rounding_bound(rng):
    x = rng.normal(size=(16, 128)).astype(np.float32)
    w = (rng.normal(size=(128, 64)) / 11).astype(np.float32)
    y = np.asarray(quant.w8a8_dot_general(x, w, DENSE_DIMS), np.float64)  # float w: quantized here
    s_a = np.abs(x).max(1, keepdims=True) / 127.0
    s_w = np.abs(w).max(0, keepdims=True) / 127.0
    # |a s_a - x| <= s_a / 2, |v s_w - w| <= s_w / 2 elementwise
    bound = (
        (np.abs(x) @ np.ones_like(w)) * s_w / 2 + s_a / 2 * np.abs(w).sum(0) + 128 * s_a * s_w / 4
    )
    err = np.abs(y - x.astype(np.float64) @ w.astype(np.float64))
    assert np.all(err <= bound * 1.001 + 1e-6)
    assert err.max() > 0  # really quantized


def test_compiled_program_has_int8_dot(rng, monkeypatch):
    x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
    q = quant.quantize(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), bits=8)
    monkeypatch.setenv("JAXCOMP_NATIVE", "0")  # XLA's own lowering (the native AMX kernel is
    f = jax.jit(lambda x, q: quant.w8a8_dot_general(x, q, DENSE_DIMS))  # in test_native.py)
    assert _int8_dot_in_hlo(f.lower(x, q).compile().as_text())
    g = jax.jit(lambda x, w: x @ w)
    assert not _int8_dot_in_hlo(g.lower(x, q.dequantize()).compile().as_text())


def test_w8a8_rejects_grouped_or_4bit_weights_and_int_inputs(rng):
    w = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match="group_size=32"):
        quant.w8a8_dot_general(x, quant.quantize(w, bits=8, group_size=32), DENSE_DIMS)
    with pytest.raises(ValueError, match="bits=4"):
        quant.w8a8_dot_general(x, quant.quantize(w, bits=4), DENSE_DIMS)
    with pytest.raises(ValueError, match="channel_axis=0"):
        quant.w8a8_dot_general(x, quant.quantize(w, bits=8, channel_axis=0), DENSE_DIMS)
    with pytest.raises(TypeError, match="int32"):
        quant.w8a8_dot_general(jnp.ones((2, 64), jnp.int32), w, DENSE_DIMS)
    with pytest.raises(ValueError, match="'int4'"):
        quant.quantized_apply(nn.Dense(2), {}, x, mode="int4")


def test_fp8_dot_matches_reference(rng):
    x = rng.normal(size=(6, 48)).astype(np.float32)
    w = rng.normal(size=(48, 10)).astype(np.float32)
    y = np.asarray(jax.jit(quant.fp8_dot_general, static_argnums=2)(x, w, DENSE_DIMS))
    s_a = (np.abs(x).max(1, keepdims=True) / np.float32(448)).astype(np.float32)
    s_w = (np.abs(w).max(0, keepdims=True) / np.float32(448)).astype(np.float32)
    a = (x / s_a).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    v = (w / s_w).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    ref = (a @ v) * s_a * s_w
    # float32 accumulation of 48 exact fp8 products: relative error ~ 48 * 2^-24
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    q = quant.quantize(w, bits=8, fmt="fp8_e4m3")
    y_q = np.asarray(quant.fp8_dot_general(x, q, DENSE_DIMS))
    np.testing.assert_allclose(y_q, ref, rtol=1e-5, atol=1e-5)


def _mlp_params(rng_key=0):
    model = nn.Sequential([nn.Dense(48), nn.relu, nn.Dense(10)])
    params = model.init(jax.random.key(rng_key), jnp.ones((1, 32)))["params"]
    params = jax.tree.map(lambda p: p + 0.1 if p.ndim == 1 else p, params)  # non-zero biases
    return model, params


def _dense_ref(x, q, bias):
    return _ref_w8a8(x, q.codes, q.scale)[1] + np.asarray(bias, np.float64)


def test_quantized_apply_w8a8_stock_linen_model(rng):
    model, params = _mlp_params()
    qparams = quant.quantize_tree(params)
    x = rng.normal(size=(9, 32)).astype(np.float32)
    f = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x, mode="w8a8"))
    y = f(qparams, x)
    h = np.maximum(_dense_ref(x, qparams["layers_0"]["kernel"], params["layers_0"]["bias"]), 0)
    ref = _dense_ref(
        h.astype(np.float32), qparams["layers_2"]["kernel"], params["layers_2"]["bias"]
    )
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    assert _int8_dot_in_hlo(f.lower(qparams, x).compile().as_text())
    f(qparams, x + 1)  # no recompilation on new values
    assert f._cache_size() == 1
    # the float model on the same params is close (8-bit rounding only)
    y_float = model.apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(y - y_float))) < 0.05 * float(jnp.max(jnp.abs(y_float)))


def test_quantized_apply_weight_only_int4_matches_dequantized(rng):
    model, params = _mlp_params()
    config = quant.QuantConfig(bits=4, group_size=16)
    qparams = quant.quantize_tree(params, default=config)
    x = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
    y = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x, mode="weight_only"))(
        qparams, x
    )
    y_ref = model.apply({"params": quant.dequantize_tree(qparams)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)


def test_einsum_with_quantized_kernel(rng):
    model = nn.Einsum((5, 6, 7), "abc,cde->abde")
    x = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    params = model.init(jax.random.key(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": params["bias"] + 0.5}
    qparams = quant.quantize_tree(params)  # channel axis e (last), contraction over c
    q = qparams["kernel"]
    y = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x))(qparams, x)
    # reference: the int8 computation written out with numpy
    a, s_a = _ref_act(np.asarray(x))  # per token over c
    codes = np.asarray(q.codes, np.int64).reshape(5, 6, 7)
    acc = np.einsum("abc,cde->abde", a, codes)
    ref = acc * s_a[..., None] * np.asarray(q.scale, np.float64).reshape(1, 1, 1, 7)
    ref = ref + np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    y_wo = quant.quantized_apply(model, {"params": qparams}, x, mode="weight_only")
    y_deq = model.apply({"params": quant.dequantize_tree(qparams)}, x)
    np.testing.assert_allclose(np.asarray(y_wo), np.asarray(y_deq), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no '...'"):
        quant.quantized_apply(nn.Einsum((5, 6), "...c,cd->...d"), {"params": qparams}, x)


def test_conv_falls_back_to_dequantized_params(rng):
    model = nn.Conv(4, (3, 3))
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    qparams = quant.quantize_tree(params, default=quant.QuantConfig(bits=4))
    y = quant.quantized_apply(model, {"params": qparams}, x)
    y_ref = model.apply({"params": quant.dequantize_tree(qparams)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)


def test_dot_general_argument_of_dense_and_nnx_linear(rng):
    x = jnp.asarray(rng.normal(size=(4, 24)), jnp.float32)
    dense = nn.Dense(8, dot_general=quant.w8a8_dot_general)
    params = dense.init(jax.random.key(0), x)["params"]
    y = jax.jit(dense.apply)({"params": params}, x)
    q = quant.quantize(params["kernel"], bits=8)
    np.testing.assert_allclose(
        np.asarray(y), _dense_ref(x, q, params["bias"]), rtol=1e-5, atol=1e-6
    )

    linear = nnx.Linear(24, 8, dot_general=quant.w8a8_dot_general, rngs=nnx.Rngs(0))
    y_nnx = nnx.jit(lambda m, x: m(x))(linear, x)
    q = quant.quantize(linear.kernel[...], bits=8)
    ref = _dense_ref(x, q, linear.bias[...])
    np.testing.assert_allclose(np.asarray(y_nnx), ref, rtol=1e-5, atol=1e-6)


def test_w8a8_on_8_device_mesh_with_sharded_batch(rng):
    model, params = _mlp_params()
    qparams = quant.quantize_tree(params)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    f = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x))
    y_sharded = f(qparams, xs)
    assert len(y_sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(y_sharded), np.asarray(f(qparams, x)), rtol=1e-6)
