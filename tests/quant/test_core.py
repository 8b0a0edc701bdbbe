"""quantize / dequantize / QArray against float64 numpy references."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.quant import QArray, dequantize, quantize
from jaxcomp.quant._layout import pack, unpack
from tests.quant import _reference as ref

# (shape, channel_axis, group_size): Dense per channel / per group, per tensor,
# conv kernel [h, w, in, out] with groups over the flattened h*w*in rows,
# a PyTorch-style [out, in] kernel with channel_axis=0, grouped per tensor.
GRANULARITIES = [
    ((64, 24), -1, None),
    ((64, 24), -1, 16),
    ((64, 24), None, None),
    ((3, 3, 8, 16), -1, 24),
    ((24, 40), 0, 8),
    ((96,), None, 32),
]
# The three storage paths (4 per byte, 2 per byte, int8) in both modes; 4 and 6 bits come below.
BITS_SYMMETRIC = [(2, True), (2, False), (3, True), (8, True), (8, False)]


def _data(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _check_against_reference(x, q, bits, channel_axis, group_size, symmetric, calibration, pct):
    """Scales close to the reference, codes and zero points exactly on the reference grid."""
    xg = ref.grouped(ref.matrix_view(x, channel_axis), group_size)
    lo, hi = ref.clip_range(xg, symmetric, calibration, pct)
    scale_ref, _ = ref.params_from_range(lo, hi, bits, symmetric)
    # float32 range and division vs float64: a few ulp. Percentile interpolates in float32
    # between order statistics that can differ 20x (the outlier): eps * 20 relative error.
    rtol = 2e-5 if calibration == "percentile" else 2e-6
    np.testing.assert_allclose(np.asarray(q.scale), scale_ref, rtol=rtol)
    scale = np.asarray(q.scale, np.float64)
    qmin = ref.grid(bits)[0]
    zero = None if symmetric else np.clip(qmin - np.round(lo / scale), qmin, 2**bits + qmin - 1)
    if zero is not None:
        np.testing.assert_array_equal(np.asarray(q.zero_point), zero)
    codes = ref.codes(xg, scale, zero, bits).reshape(-1, xg.shape[-1])
    np.testing.assert_array_equal(np.asarray(q.grid_values()), codes)
    x_hat = ref.dequant(ref.grouped(codes, group_size), scale, zero)
    return xg, x_hat, scale


@pytest.mark.parametrize("bits,symmetric", BITS_SYMMETRIC)
@pytest.mark.parametrize("shape,channel_axis,group_size", GRANULARITIES)
def test_codes_scales_and_error_match_reference(
    rng, bits, symmetric, shape, channel_axis, group_size
):
    x = _data(rng, shape)
    q = quantize(x, bits, channel_axis=channel_axis, group_size=group_size, symmetric=symmetric)
    xg, x_hat_ref, scale = _check_against_reference(
        x, q, bits, channel_axis, group_size, symmetric, "absmax", None
    )
    assert q.shape == shape and q.dtype == "float32" and q.bits == bits
    assert q.packed == (bits <= 4)
    assert q.codes.dtype == (jnp.uint8 if bits <= 4 else jnp.int8)
    x_hat = np.asarray(dequantize(q), np.float64)
    assert x_hat.shape == shape and dequantize(q).dtype == jnp.float32
    # Dequantized values equal the reference ones up to float32 rounding of (q - z) * s.
    x_hat_view = ref.grouped(ref.matrix_view(x_hat, channel_axis), group_size)
    np.testing.assert_allclose(x_hat_view, x_hat_ref, rtol=1e-6, atol=0)
    # Nothing is clipped by absmax/minmax: every error is at most half a step.
    err = np.abs(x_hat_view - xg)
    assert np.all(err <= scale[:, None, :] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("calibration", ["absmax", "minmax", "percentile"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_calibrations_match_reference(rng, calibration, symmetric):
    x = _data(rng, (128, 8))
    x[5, 3] = 40.0  # an outlier that percentile clipping should cut
    q = quantize(x, 4, group_size=64, symmetric=symmetric, calibration=calibration, percentile=99.0)
    _check_against_reference(x, q, 4, -1, 64, symmetric, calibration, 99.0)
    if calibration == "percentile":
        top = float(q.scale[0, 3]) * (7 - (0 if symmetric else int(q.zero_point[0, 3])))
        assert float(dequantize(q)[5, 3]) == pytest.approx(top, rel=1e-6) and top < 20.0


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_calibration_finds_best_clipping_ratio(rng, bits, symmetric):
    x = rng.standard_t(3, size=(256, 8)).astype(np.float32)
    q = quantize(x, bits, group_size=64, symmetric=symmetric, calibration="mse")
    xg = ref.grouped(ref.matrix_view(x, -1), 64)
    lo, hi = ref.clip_range(xg, symmetric)

    def sse(ratio):
        scale, zero = ref.params_from_range(lo * ratio, hi * ratio, bits, symmetric)
        x_hat = ref.dequant(ref.codes(xg, scale, zero, bits), scale, zero)
        return ((x_hat - xg) ** 2).sum(axis=1)

    errs = np.stack([sse(r) for r in np.linspace(1.0, 0.5, 100)])
    got = ((ref.grouped(ref.matrix_view(np.asarray(dequantize(q)), -1), 64) - xg) ** 2).sum(1)
    # The search and the dequantized values are float32: x_hat carries ~6e-8 |x| of rounding
    # against an 8-bit error of ~|x| / 400, i.e. ~3e-5 relative change in the SSE; 1e-4 covers it.
    assert np.all(got <= errs.min(axis=0) * (1 + 1e-4) + 1e-12)
    assert np.all(got <= errs[0] * (1 + 1e-4))  # never worse than no clipping
    full_scale = ref.params_from_range(lo, hi, bits, symmetric)[0]
    ratio = np.asarray(q.scale) / full_scale
    assert np.all((ratio >= 0.5 - 1e-6) & (ratio <= 1 + 1e-6))
    assert np.any(ratio < 0.999)  # heavy tails: clipping pays off somewhere


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_zero_is_exact(rng, bits):
    x = np.abs(_data(rng, (32, 8))) + 1.0  # all positive: the range is clamped to contain 0
    x[::3] = 0.0
    x[:, 5] -= 3.0
    x[::3, 5] = 0.0
    q = quantize(x, bits, symmetric=False, group_size=8)
    x_hat = np.asarray(dequantize(q))
    assert np.all(x_hat[::3] == 0.0)


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False), (8, True)])
@pytest.mark.parametrize("shape,channel_axis,group_size", GRANULARITIES[:4])
def test_requantizing_gives_identical_codes(rng, bits, symmetric, shape, channel_axis, group_size):
    kwargs = dict(channel_axis=channel_axis, group_size=group_size, symmetric=symmetric)
    q = quantize(_data(rng, shape), bits, **kwargs)
    q2 = quantize(dequantize(q), bits, **kwargs)
    np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q.codes))
    if not symmetric:
        np.testing.assert_array_equal(np.asarray(q2.zero_point), np.asarray(q.zero_point))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 7, 8, 33])
def test_packing_round_trip_and_layout(rng, bits, rows):
    unsigned = rng.integers(0, 2**bits, size=(rows, 5))
    packed = pack(jnp.asarray(unsigned, jnp.int32), bits)
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed), ref.pack(unsigned, bits))
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits, rows)), unsigned)


def test_nbytes_is_measured_and_int4_group_is_small():
    spec = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    q4 = jax.eval_shape(functools.partial(quantize, bits=4, group_size=128), spec)
    q8 = jax.eval_shape(functools.partial(quantize, bits=8), spec)
    assert q4.codes.shape == (2048, 4096) and q4.scale.shape == (32, 4096)
    assert q4.nbytes == 4096 * 2048 + 32 * 4096 * 4
    assert q8.nbytes == 4096 * 4096 + 4096 * 4
    assert q4.nbytes <= 0.5625 * q8.nbytes


@pytest.mark.parametrize(
    "bits,symmetric", [(2, True), (3, False), (4, True), (6, False), (8, True)]
)
def test_nbytes_equals_bytes_of_the_arrays(rng, bits, symmetric):
    q = quantize(_data(rng, (40, 24)), bits, group_size=8, symmetric=symmetric)
    arrays = [q.codes, q.scale] + ([] if symmetric else [q.zero_point])
    assert q.nbytes == sum(np.asarray(a).nbytes for a in arrays)
    per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
    assert q.codes.shape == (-(-40 // per_byte), 24)
    assert q.size == 960 and q.ndim == 2


@pytest.mark.parametrize("calibration", ["absmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric,bits", [(True, 4), (False, 8)])
def test_all_zero_channels_and_groups(rng, calibration, symmetric, bits):
    x = _data(rng, (32, 6))
    x[:, 2] = 0.0
    x[8:16, 4] = 0.0  # one all-zero group
    q = quantize(x, bits, group_size=8, symmetric=symmetric, calibration=calibration)
    assert np.all(np.isfinite(np.asarray(q.scale)))
    x_hat = np.asarray(dequantize(q))
    assert np.all(x_hat[:, 2] == 0.0) and np.all(x_hat[8:16, 4] == 0.0)
    assert np.all(np.isfinite(x_hat))
    assert quantize(np.zeros((4, 4), np.float32), bits, channel_axis=None).scale.item() == 1.0


def test_bfloat16_keeps_dtype(rng):
    x = jnp.asarray(_data(rng, (16, 8)), jnp.bfloat16)
    q = quantize(x, 4, group_size=8)
    assert q.dtype == "bfloat16"
    x_hat = dequantize(q)
    assert x_hat.dtype == jnp.bfloat16
    err = np.abs(np.asarray(x_hat, np.float64) - np.asarray(x, np.float64))
    # Half a step plus the bfloat16 rounding of the result (8 bits of mantissa).
    bound = np.repeat(np.asarray(q.scale), 8, axis=0) / 2 + np.abs(np.asarray(x, np.float64)) / 128
    assert np.all(err <= bound)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bits=1), ValueError, "bits is 1"),
        (dict(bits=9), ValueError, "bits is 9"),
        (dict(bits=4.0), TypeError, "bits is 4.0"),
        (dict(group_size=0), ValueError, "group_size is 0"),
        (dict(group_size=-8), ValueError, "group_size is -8"),
        (dict(group_size=5), ValueError, "group_size 5 does not divide the 16 rows"),
        (dict(calibration="kl"), ValueError, "calibration is 'kl'"),
        (dict(channel_axis=2), ValueError, "channel_axis is 2"),
        (dict(channel_axis=1.0), TypeError, "channel_axis is 1.0"),
        (dict(symmetric=1), TypeError, "symmetric is 1"),
        (dict(calibration="percentile", percentile=0.0), ValueError, "percentile is 0.0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(jnp.ones((16, 4)), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point.*int32"):
        quantize(jnp.ones((4, 4), jnp.int32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((4, 4), np.float32)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(x)
    with pytest.raises(TypeError, match="expects a QArray"):
        dequantize(jnp.ones(3))
    assert quantize(jnp.ones((4, 4)), np.int64(4), group_size=np.int32(2)).bits == 4


def test_jit_matches_eager_without_recompiling(rng):
    traces = []

    @functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric"))
    def roundtrip(x, bits, group_size, symmetric):
        traces.append(1)
        q = quantize(x, bits, group_size=group_size, symmetric=symmetric, calibration="mse")
        return q, dequantize(q)

    x = _data(rng, (64, 16))
    for bits, symmetric in [(4, True), (8, False)]:
        q, x_hat = roundtrip(x, bits, 16, symmetric)
        eager = quantize(x, bits, group_size=16, symmetric=symmetric, calibration="mse")
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(eager), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(dequantize(eager)))
    n = len(traces)
    roundtrip(x + 1.0, 4, 16, True)
    assert len(traces) == n == 2


@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(8, None, True), (4, 16, False), (2, 8, True)]
)
def test_sharded_over_output_axis_matches_unsharded(rng, bits, group_size, symmetric):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    x = _data(rng, (64, 128))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    xs = jax.device_put(x, sharding)
    fn = jax.jit(
        lambda x: quantize(x, bits, group_size=group_size, symmetric=symmetric, calibration="mse")
    )
    q_sharded, q = fn(xs), fn(x)
    assert len(q_sharded.scale.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(q_sharded), jax.tree.leaves(q), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x_hat = jax.jit(dequantize)(q_sharded)
    np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(dequantize(q)))


def test_qarray_is_a_pytree_and_rebuilds_from_json(rng):
    q = quantize(_data(rng, (16, 8)), 4, group_size=4, symmetric=False)
    leaves, treedef = jax.tree.flatten(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.float32, jnp.int8]
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, QArray) and again.group_size == 4 and again.zero_point is leaves[2]
    meta = json.loads(json.dumps({k: getattr(q, k) for k in QArray.META_FIELDS}))
    assert isinstance(meta["shape"], list)
    data = {k: getattr(q, k) for k in QArray.DATA_FIELDS}
    rebuilt = QArray(**data, **meta)
    assert rebuilt.shape == (16, 8) and hash(jax.tree.structure(rebuilt)) == hash(treedef)
    np.testing.assert_array_equal(np.asarray(rebuilt.dequantize()), np.asarray(q.dequantize()))
    with pytest.raises(ValueError, match="fmt is 'int3'"):
        QArray(**data, **{**meta, "fmt": "int3"})


def test_pmap_quantize_dequantize_matches_per_device(rng):
    x = _data(rng, (8, 32, 4))

    def roundtrip(x):
        q = quantize(x, 4, group_size=8, symmetric=False)
        return q, dequantize(q)

    q, x_hat = jax.pmap(roundtrip)(x)
    for i in range(8):
        q_i, x_hat_i = jax.jit(roundtrip)(x[i])
        np.testing.assert_array_equal(np.asarray(q.codes[i]), np.asarray(q_i.codes))
        np.testing.assert_array_equal(np.asarray(x_hat[i]), np.asarray(x_hat_i))
    np.testing.assert_array_equal(np.asarray(jax.pmap(dequantize)(q)), np.asarray(x_hat))
