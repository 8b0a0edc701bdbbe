"""Calibration statistics: streaming Hessians with masks, Linen/NNX capture, mesh and pmap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcomp import ptq, train
from jaxcomp.models import MLP, NNXMLP, init_params


def _np_stats(x, where=None):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    if where is not None:
        x = x[np.asarray(where).reshape(-1)]
    return 2 * x.T @ x, len(x), (x**2).sum(0), np.abs(x).max(0, initial=0.0), np.abs(x).sum(0)


def test_accumulate_matches_numpy_with_mask(rng):
    xs = [rng.normal(size=(3, 5, 6)).astype(np.float32) for _ in range(3)]
    ws = [rng.random((3, 5)) < 0.6 for _ in range(3)]
    stats = ptq.init_stats(6)
    step = jax.jit(ptq.accumulate)
    for x, w in zip(xs, ws, strict=True):
        stats = step(stats, x, w)
    h, n, sq, mx, ab = _np_stats(np.concatenate(xs), np.concatenate(ws))
    assert int(stats.count) == n
    np.testing.assert_allclose(stats.hessian, h, rtol=1e-5, atol=1e-4)  # float32 sums of ~40 terms
    np.testing.assert_allclose(stats.sq_sum, sq, rtol=1e-5)
    np.testing.assert_allclose(stats.abs_max, mx, rtol=0)
    np.testing.assert_allclose(stats.abs_sum, ab, rtol=1e-5)
    np.testing.assert_allclose(ptq.mean_hessian(stats), h / n, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"where has shape \(3,\)"):
        ptq.accumulate(stats, xs[0], np.ones(3, bool))


def _linen_inputs(params, x):
    """Inputs of each Dense of jaxcomp.models.MLP, computed by hand in float64."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    out = {}
    for i in range(3):
        layer = params[f"Dense_{i}"]
        out[f"Dense_{i}/kernel"] = h
        h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        h = np.maximum(h, 0)
    return out


def test_linen_capture_streams_and_masks(rng):
    model = MLP((12, 10), 4)
    params = init_params(model, (8,))
    xs = [rng.normal(size=(16, 8)).astype(np.float32) for _ in range(3)]
    ws = [rng.random(16) < 0.7 for _ in range(3)]
    stats, order = ptq.capture_stats(model, params, list(zip(xs, ws, strict=True)))
    assert order == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    ref = _linen_inputs(params, np.concatenate(xs))
    for name in order:
        h, n, *_ = _np_stats(ref[name], np.concatenate(ws))
        assert int(stats[name].count) == n
        np.testing.assert_allclose(stats[name].hessian, h, rtol=1e-4, atol=1e-3)


def test_nnx_capture_matches_linen_layout(rng):
    model = NNXMLP(8, (12,), 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    stats, order = ptq.capture_stats(graphdef, state, [x])
    assert order == ["hidden/0/kernel", "head/kernel"]
    hidden = np.maximum(
        x @ np.asarray(model.hidden[0].kernel[...]) + np.asarray(model.hidden[0].bias[...]), 0
    )
    np.testing.assert_allclose(
        stats["head/kernel"].hessian, 2 * hidden.T @ hidden, rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(stats["hidden/0/kernel"].hessian, 2 * x.T @ x, rtol=1e-5, atol=1e-4)


def test_sharded_batches_and_pmap(rng):
    model = MLP((12,), 4)
    params = init_params(model, (8,))
    x = rng.normal(size=(32, 8)).astype(np.float32)
    single, _ = ptq.capture_stats(model, params, [x])
    mesh = train.data_mesh()
    sharded, _ = ptq.capture_stats(
        model, train.replicate(params, mesh), [train.shard_batch(x, mesh)]
    )
    for name in single:
        np.testing.assert_allclose(
            sharded[name].hessian, single[name].hessian, rtol=1e-5, atol=1e-4
        )
        assert int(sharded[name].count) == 32

    def per_device(xd):
        return ptq.psum_stats(ptq.accumulate(ptq.init_stats(8), xd), "d")

    out = jax.pmap(per_device, axis_name="d")(x.reshape(8, 4, 8))
    np.testing.assert_allclose(
        out.hessian[0], single["Dense_0/kernel"].hessian, rtol=1e-5, atol=1e-4
    )
    assert int(out.count[0]) == 32


def test_nan_activations_and_bad_mask(rng):
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    x = rng.normal(size=(6, 4)).astype(np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="kernel: NaN or Inf in the layer's calibration inputs"):
        ptq.capture_stats(model, params, [x])
    with pytest.raises(ValueError, match=r"mask has shape \(5,\)"):
        ptq.capture_stats(model, params, [(x, np.ones(5, bool))])


class _EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [b, t, n, h]
        y = nn.Einsum((3, 4, 6), "btnh,nhd->btd", name="merge")(x)
        return nn.Einsum((6, 5), "btd,de->bte", use_bias=False, name="head")(nn.relu(y))


def test_einsum_capture_and_gptq(rng):
    model = _EinsumNet()
    x = rng.normal(size=(2, 7, 3, 4)).astype(np.float32)
    where = rng.random((2, 7)) < 0.8
    params = model.init(jax.random.key(0), x)["params"]
    stats, order = ptq.capture_stats(model, params, [(x, where)])
    assert order == ["merge/kernel", "head/kernel"]
    rows = x.reshape(2, 7, 12)[where].astype(np.float64)  # contracted (n, h) flattened in order
    np.testing.assert_allclose(
        stats["merge/kernel"].hessian, 2 * rows.T @ rows, rtol=1e-5, atol=1e-4
    )
    assert int(stats["merge/kernel"].count) == where.sum()
    qparams, _ = ptq.compress_model(model, params, [(x, where)], default=ptq.GPTQConfig(bits=8))
    assert qparams["merge"]["kernel"].shape == (3, 4, 6)
    np.testing.assert_allclose(
        qparams["merge"]["kernel"].dequantize(), params["merge"]["kernel"], atol=0.02
    )


class _HeadsEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 2, 3), "btd,dnh->btnh", name="qkv")(x)


def test_unsupported_einsum_is_named_when_targeted(rng):
    model = _HeadsEinsum()
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    stats, order = ptq.capture_stats(model, params, [x])  # untargeted: skipped
    assert order == [] and stats == {}
    with pytest.raises(ValueError, match=r"qkv/kernel: einsum 'btd,dnh->btnh' is not supported"):
        ptq.capture_stats(model, params, [x], targets=["qkv/kernel"])


def test_capture_keeps_no_batch_alive(rng):
    """Streaming: a batch (and its activations) is released once the next one is read."""
    import gc
    import weakref

    model = MLP((12,), 4)
    params = init_params(model, (8,))
    refs = []

    def batches():
        for _ in range(12):
            gc.collect()
            assert sum(r() is not None for r in refs) <= 1, "earlier batches are still alive"
            x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
            refs.append(weakref.ref(x))
            yield x

    stats, _ = ptq.capture_stats(model, params, batches())
    assert int(stats["Dense_0/kernel"].count) == 12 * 16
