"""fp8 (e4m3, e5m2) and NF4 codes against numpy / ml_dtypes references."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxcomp.quant import QArray, QuantConfig, dequantize, fake_quant, quantize, quantize_tree
from jaxcomp.quant._formats import NF4_LEVELS
from tests.quant import _reference as ref

FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
# The 16 NF4 levels of QLoRA (bitsandbytes), written out independently of the package.
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(FP8))
@pytest.mark.parametrize("calibration", ["absmax", "percentile"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_fp8_codes_match_ml_dtypes(rng, fmt, calibration, group_size):
    dtype, top = FP8[fmt]
    x = (rng.standard_normal((64, 12)) * np.logspace(-3, 2, 12)).astype(np.float32)
    x[3, 4] = 1e4  # an outlier that percentile calibration clips (saturating, not NaN/Inf)
    q = quantize(x, 8, fmt=fmt, group_size=group_size, calibration=calibration, percentile=99.0)
    assert q.fmt == fmt and q.codes.dtype == jnp.uint8 and not q.packed
    xg = ref.grouped(ref.matrix_view(x, -1), group_size)
    _, hi = ref.clip_range(xg, True, calibration, 99.0)
    rtol = 2e-5 if calibration == "percentile" else 2e-6  # float32 range (see test_core)
    np.testing.assert_allclose(np.asarray(q.scale), hi / top, rtol=rtol)
    # Codes: x / s in float32 (IEEE division), saturated, rounded to fp8 by ml_dtypes.
    scale = np.asarray(q.scale)
    scaled = np.clip(xg.astype(np.float32) / scale[:, None, :], -top, top)
    bits = scaled.astype(dtype).view(np.uint8).reshape(-1, x.shape[1])
    np.testing.assert_array_equal(np.asarray(q.codes), bits)
    x_hat = np.asarray(dequantize(q), np.float64)
    expected = scaled.astype(dtype).astype(np.float64) * scale[:, None, :].astype(np.float64)
    np.testing.assert_allclose(
        ref.grouped(ref.matrix_view(x_hat, -1), group_size), expected, rtol=1e-7
    )
    assert np.all(np.isfinite(x_hat))
    assert q.nbytes == x.size + scale.size * 4


@pytest.mark.parametrize("group_size", [8, 64])
def test_nf4_codes_are_nearest_levels(rng, group_size):
    x = rng.standard_normal((128, 6)).astype(np.float32)
    x[:, 2] = 0.0
    q = quantize(x, 4, fmt="nf4", group_size=group_size)
    np.testing.assert_array_equal(NF4_LEVELS, NF4.astype(np.float32))
    assert q.packed and q.codes.shape == (64, 6) and q.codes.dtype == jnp.uint8
    xg = ref.grouped(ref.matrix_view(x, -1), group_size)
    absmax = np.abs(xg).max(axis=1)
    np.testing.assert_allclose(np.asarray(q.scale), np.where(absmax > 0, absmax, 1.0), rtol=1e-7)
    scaled = xg / np.asarray(q.scale, np.float64)[:, None, :]
    index = np.abs(scaled[..., None] - NF4).argmin(axis=-1)
    unsigned = index.reshape(-1, x.shape[1])
    np.testing.assert_array_equal(np.asarray(q.codes), ref.pack(unsigned, 4))
    x_hat = np.asarray(dequantize(q), np.float64)
    expected = NF4[index] * np.asarray(q.scale, np.float64)[:, None, :]
    np.testing.assert_allclose(
        ref.grouped(ref.matrix_view(x_hat, -1), group_size), expected, rtol=1e-6
    )
    assert np.all(x_hat[:, 2] == 0.0)


def test_nbytes_of_nf4_and_fp8_for_a_large_kernel():
    spec = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    nf4 = jax.eval_shape(functools.partial(quantize, bits=4, fmt="nf4", group_size=64), spec)
    fp8 = jax.eval_shape(functools.partial(quantize, bits=8, fmt="fp8_e4m3"), spec)
    assert nf4.nbytes == 4096 * 4096 // 2 + 64 * 4096 * 4
    assert fp8.nbytes == 4096 * 4096 + 4096 * 4


def test_formats_in_trees_fake_quant_and_sharding(rng):
    params = {"a": {"kernel": rng.standard_normal((64, 16)).astype(np.float32)}}
    params["b"] = {"kernel": params["a"]["kernel"] * 3}
    rules = [
        ("a/kernel", QuantConfig(bits=4, fmt="nf4", group_size=32)),
        ("b/kernel", QuantConfig(bits=8, fmt="fp8_e5m2", calibration="mse")),
    ]
    q = quantize_tree(params, rules)
    assert q["a"]["kernel"].fmt == "nf4" and q["b"]["kernel"].fmt == "fp8_e5m2"
    for name, (_, config) in zip(("a", "b"), rules, strict=True):
        x = params[name]["kernel"]
        kwargs = dict(fmt=config.fmt, group_size=config.group_size, calibration=config.calibration)
        np.testing.assert_array_equal(
            np.asarray(fake_quant(x, config.bits, **kwargs)),
            np.asarray(dequantize(q[name]["kernel"])),
        )
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharded = jax.device_put(
        params["a"]["kernel"],
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")),
    )
    qs = jax.jit(lambda x: quantize(x, 4, fmt="nf4", group_size=32))(sharded)
    for a, b in zip(jax.tree.leaves(qs), jax.tree.leaves(q["a"]["kernel"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp8_fake_quant_gradient_masks_saturated_values():
    x = jnp.array([[0.5], [-1.0], [2.0], [900.0]], jnp.float32)
    g = jax.grad(
        lambda x: jnp.sum(
            fake_quant(x, 8, fmt="fp8_e4m3", calibration="percentile", percentile=50.0)
        )
    )(x)
    # Percentile 50 of |x| is 1.5: the scale maps 1.5 to 448, so 2.0 and 900 saturate.
    np.testing.assert_array_equal(np.asarray(g)[:, 0], [1.0, 1.0, 0.0, 0.0])


def test_format_errors():
    with pytest.raises(ValueError, match="bits is 8 with fmt 'nf4'.*bits=4"):
        quantize(jnp.ones((8, 2)), 8, fmt="nf4")
    with pytest.raises(ValueError, match="symmetric is False with fmt 'fp8_e4m3'"):
        quantize(jnp.ones((8, 2)), 8, fmt="fp8_e4m3", symmetric=False)
    with pytest.raises(ValueError, match="fmt is 'fp4'"):
        quantize(jnp.ones((8, 2)), 4, fmt="fp4")
    with pytest.raises(ValueError, match="fmt is 'bad'"):
        QArray(
            codes=None, scale=None, bits=8, shape=(1,), dtype="float32", channel_axis=0, fmt="bad"
        )
