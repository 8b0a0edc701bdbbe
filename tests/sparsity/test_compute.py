"""compute_masks: exact counts, deterministic ties, N:M, scopes, scores, rules, errors, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp.sparsity as sp


def _ref_keep(scores, keep):
    """float64 numpy reference: keep the `keep` largest, lower index first among ties."""
    scores = np.asarray(scores, np.float64).ravel()
    order = np.lexsort((np.arange(scores.size), -scores))
    mask = np.zeros(scores.size, bool)
    mask[order[:keep]] = True
    return mask


def _mlp(rng, dims=((13, 7), (7, 5), (5, 3))):
    return {
        f"Dense_{i}": {
            "kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(shape[1]), jnp.float32),
        }
        for i, shape in enumerate(dims)
    }


def test_layer_scope_prunes_exactly_round_s_n(rng):
    params = _mlp(rng)
    for sparsity in (0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99):
        masks = sp.compute_masks(params, sparsity=sparsity)
        for name, layer in params.items():
            w = np.asarray(layer["kernel"])
            m = np.asarray(masks[name]["kernel"])
            assert m.dtype == np.bool_ and masks[name]["bias"] is None
            assert w.size - m.sum() == round(sparsity * w.size)
            expected = _ref_keep(np.abs(w), w.size - round(sparsity * w.size)).reshape(w.shape)
            np.testing.assert_array_equal(m, expected)
    jitted = jax.jit(functools.partial(sp.compute_masks, sparsity=0.99))(params)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(masks), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ties_are_broken_by_lower_flat_index(rng):
    w = rng.integers(-2, 3, size=(32, 9)).astype(np.float32)
    w[:, 3] = -0.0
    for sparsity in (0.3, 0.5, 0.77):
        m = np.asarray(sp.compute_masks({"kernel": jnp.asarray(w)}, sparsity=sparsity)["kernel"])
        keep = w.size - round(sparsity * w.size)
        np.testing.assert_array_equal(m.ravel(), _ref_keep(np.abs(w), keep))
    same = jnp.ones((10, 10), jnp.float32)
    m = np.asarray(sp.compute_masks({"kernel": same}, sparsity=0.35)["kernel"]).ravel()
    np.testing.assert_array_equal(m, np.arange(100) < 65)


def test_global_scope_one_threshold_exact_total(rng):
    params = _mlp(rng)
    params["Dense_1"]["kernel"] = jnp.round(params["Dense_1"]["kernel"])
    for sparsity in (0.4, 0.8):
        masks = jax.jit(functools.partial(sp.compute_masks, sparsity=sparsity, scope="global"))(
            params
        )
        kernels = [np.asarray(params[f"Dense_{i}"]["kernel"]) for i in range(3)]
        total = sum(k.size for k in kernels)
        flat = np.concatenate([np.abs(k).ravel() for k in kernels])
        expected = _ref_keep(flat, total - round(sparsity * total))
        got = np.concatenate([np.asarray(masks[f"Dense_{i}"]["kernel"]).ravel() for i in range(3)])
        np.testing.assert_array_equal(got, expected)
        assert total - got.sum() == round(sparsity * total)
    # ties across leaves: the earlier leaf in tree order keeps first (35 entries, 18 pruned)
    ones = {"b": jnp.ones((3, 5), jnp.float32), "a": jnp.ones((4, 5), jnp.float32)}
    masks = sp.compute_masks(ones, sparsity=0.5, scope="global")
    np.testing.assert_array_equal(np.asarray(masks["a"]).ravel(), np.arange(20) < 17)
    assert not np.asarray(masks["b"]).any()


def test_output_scope_prunes_each_column(rng):
    w = rng.integers(-3, 4, size=(10, 6)).astype(np.float32)
    m = np.asarray(
        sp.compute_masks({"kernel": jnp.asarray(w)}, sparsity=0.3, scope="output")["kernel"]
    )
    for col in range(6):
        np.testing.assert_array_equal(m[:, col], _ref_keep(np.abs(w[:, col]), 10 - 3))


def _ref_nm(w2d, n, m):
    keep = np.zeros(w2d.shape, bool)
    for col in range(w2d.shape[1]):
        for start in range(0, w2d.shape[0], m):
            group = np.abs(w2d[start : start + m, col])
            keep[start : start + m, col] = _ref_keep(group, n)
    return keep


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("1:4", 1, 4), ("3:8", 3, 8)])
def test_n_m_keeps_exactly_n_per_group_along_input(rng, pattern, n, m):
    dense = rng.integers(-2, 3, size=(16, 6)).astype(np.float32)
    conv = rng.standard_normal((3, 3, 8, 5)).astype(np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(dense)}, "Conv_0": {"kernel": jnp.asarray(conv)}}
    masks = jax.jit(functools.partial(sp.compute_masks, pattern=pattern))(params)
    for w, got in ((dense, masks["Dense_0"]["kernel"]), (conv, masks["Conv_0"]["kernel"])):
        got = np.asarray(got).reshape(-1, w.shape[-1])
        groups = got.reshape(-1, m, w.shape[-1])
        assert (groups.sum(axis=1) == n).all()
        np.testing.assert_array_equal(got, _ref_nm(w.reshape(-1, w.shape[-1]), n, m))
    explicit = sp.compute_masks(params, pattern=pattern, sparsity=1 - n / m)
    np.testing.assert_array_equal(explicit["Conv_0"]["kernel"], masks["Conv_0"]["kernel"])


def test_n_m_errors():
    params = {"Dense_0": {"kernel": jnp.ones((6, 4), jnp.float32)}}
    with pytest.raises(ValueError, match="Dense_0/kernel.*not divisible by M=4"):
        sp.compute_masks(params, pattern="2:4")
    ok = {"Dense_0": {"kernel": jnp.ones((8, 4), jnp.float32)}}
    with pytest.raises(ValueError, match="contradicts"):
        sp.compute_masks(ok, pattern="2:4", sparsity=0.75)
    for bad in ("4:4", "5:4", "0:4"):
        with pytest.raises(ValueError, match="0 < N < M"):
            sp.compute_masks(ok, pattern=bad)
    with pytest.raises(ValueError, match="scope 'global'"):
        sp.compute_masks(ok, pattern="2:4", scope="global")
    with pytest.raises(ValueError, match="Dense_0/bias.*rank >= 2"):
        sp.compute_masks({"Dense_0": {"bias": jnp.ones(8)}}, pattern="2:4", rules=[("bias", 0.5)])


def test_random_score_needs_key_and_is_deterministic(rng):
    params = _mlp(rng)
    key = jax.random.key(3)
    a = sp.compute_masks(params, sparsity=0.6, score="random", key=key)
    b = jax.jit(functools.partial(sp.compute_masks, sparsity=0.6, score="random"))(params, key=key)
    c = sp.compute_masks(params, sparsity=0.6, score="random", key=jax.random.key(4))
    k = np.asarray(a["Dense_0"]["kernel"])
    np.testing.assert_array_equal(k, b["Dense_0"]["kernel"])
    assert (k != np.asarray(c["Dense_0"]["kernel"])).any()
    assert k.size - k.sum() == round(0.6 * k.size)
    with pytest.raises(ValueError, match="needs key"):
        sp.compute_masks(params, score="random")
    with pytest.raises(ValueError, match="key= is only used"):
        sp.compute_masks(params, key=key)


def test_precomputed_and_saliency_scores(rng):
    params = _mlp(rng)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    saliency = sp.compute_masks(params, score="saliency", grads=grads, sparsity=0.5)
    for name in params:
        w, g = np.asarray(params[name]["kernel"]), np.asarray(grads[name]["kernel"])
        expected = _ref_keep(np.abs(w * g), w.size - round(0.5 * w.size)).reshape(w.shape)
        np.testing.assert_array_equal(saliency[name]["kernel"], expected)
    scores = {n: {"kernel": grads[n]["kernel"], "bias": None} for n in params}
    given = sp.compute_masks(params, scores=scores, sparsity=0.5)
    w = np.asarray(grads["Dense_2"]["kernel"])
    np.testing.assert_array_equal(
        given["Dense_2"]["kernel"], _ref_keep(w, w.size - 8).reshape(w.shape)
    )
    scores["Dense_1"]["kernel"] = None
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sp.compute_masks(params, scores=scores)
    scores["Dense_1"]["kernel"] = jnp.ones((5, 7), jnp.float32)
    with pytest.raises(ValueError, match="scores leaf 'Dense_1/kernel' has shape"):
        sp.compute_masks(params, scores=scores)
    with pytest.raises(ValueError, match="needs grads"):
        sp.compute_masks(params, score="saliency")


def test_rules_select_leaves_and_set_per_leaf_sparsity(rng):
    params = _mlp(rng)
    params["embed"] = {"embedding": jnp.ones((10, 4), jnp.float32)}
    params["LayerNorm_0"] = {"scale": jnp.ones((4, 4), jnp.float32)}
    params["steps"] = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    default = sp.compute_masks(params, sparsity=0.5)
    assert default["embed"]["embedding"] is None and default["LayerNorm_0"]["scale"] is None
    assert default["steps"] is None and default["Dense_0"]["bias"] is None
    masks = sp.compute_masks(
        params,
        sparsity=0.5,
        rules=[("Dense_0/kernel", 0.25), ("Dense_2", None), ("Dense_1/bias", 0.4), ("steps", 0.5)],
    )
    assert 91 - np.asarray(masks["Dense_0"]["kernel"]).sum() == round(0.25 * 91)
    assert masks["Dense_2"]["kernel"] is None
    assert np.asarray(masks["Dense_1"]["bias"]).sum() == 5 - 2
    assert np.asarray(masks["Dense_1"]["kernel"]).sum() == 35 - round(0.5 * 35)
    np.testing.assert_array_equal(masks["steps"], np.arange(12).reshape(3, 4) >= 6)
    with pytest.raises(ValueError, match="'Dense_0/kernel' is 1.5"):
        sp.compute_masks(params, rules=[("Dense_0/kernel", 1.5)])
    with pytest.raises(ValueError, match="'Dense_0/kernel'.*scope='layer'"):
        sp.compute_masks(params, scope="global", rules=[("Dense_0/kernel", 0.3)])
    with pytest.warns(UserWarning, match="nothing_here"):
        sp.compute_masks(params, rules=[("nothing_here", None)])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sparsity": 1.0}, ValueError, r"sparsity is 1.0; sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, ValueError, "must be in"),
        ({"sparsity": "0.5"}, TypeError, "sparsity is '0.5'"),
        ({"pattern": "dense"}, ValueError, "unknown pattern 'dense'"),
        ({"pattern": "block:0x4"}, ValueError, "block sides"),
        ({"score": "taylor"}, ValueError, "unknown score 'taylor'"),
        ({"scope": "model"}, ValueError, "unknown scope 'model'"),
        ({"scope": "output", "pattern": "channel"}, ValueError, "scope 'output'"),
        ({"scope": "global", "pattern": "channel"}, ValueError, "scope 'global'"),
    ],
)
def test_bad_arguments(rng, kwargs, error, match):
    with pytest.raises(error, match=match):
        sp.compute_masks(_mlp(rng), **kwargs)


def test_jit_does_not_recompile_and_works_on_a_mesh(rng):
    params = _mlp(rng, dims=((16, 8), (8, 16)))
    fn = jax.jit(functools.partial(sp.compute_masks, sparsity=0.6, scope="global"))
    first = fn(params)
    fn(jax.tree.map(lambda x: x * 2, params))
    assert fn._cache_size() == 1
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    spec = jax.sharding.PartitionSpec(None, "data")
    sharded = jax.tree.map(
        lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) if x.ndim == 2 else x,
        params,
    )
    masks = fn(sharded)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(masks), strict=True):
        np.testing.assert_array_equal(a, b)


def _ref_blocks(w, rows, cols, keep_blocks):
    k, c = w.shape
    means = np.abs(w).reshape(k // rows, rows, c // cols, cols).mean(axis=(1, 3))
    keep = _ref_keep(means, keep_blocks).reshape(means.shape)
    return np.repeat(np.repeat(keep, rows, axis=0), cols, axis=1)


@pytest.mark.parametrize(("pattern", "rows", "cols"), [("block:1x4", 1, 4), ("block:4x4", 4, 4)])
def test_block_patterns(rng, pattern, rows, cols):
    w = rng.integers(-4, 5, size=(8, 8)).astype(np.float32)
    m = np.asarray(
        sp.compute_masks({"kernel": jnp.asarray(w)}, pattern=pattern, sparsity=0.6)["kernel"]
    )
    blocks = w.size // (rows * cols)
    np.testing.assert_array_equal(m, _ref_blocks(w, rows, cols, blocks - round(0.6 * blocks)))
    with pytest.raises(ValueError, match="'kernel'.*do not tile"):
        sp.compute_masks({"kernel": jnp.ones((6, 6), jnp.float32)}, pattern=pattern)


def test_channel_pattern_prunes_whole_output_columns(rng):
    w = rng.standard_normal((3, 3, 4, 10)).astype(np.float32)
    m = np.asarray(
        sp.compute_masks({"kernel": jnp.asarray(w)}, pattern="channel", sparsity=0.3)["kernel"]
    )
    cols = np.abs(w.reshape(-1, 10)).mean(axis=0)
    expected = _ref_keep(cols, 10 - 3)
    np.testing.assert_array_equal(m, np.broadcast_to(expected, w.shape))


def _ref_erk(shapes, sparsity):
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], np.float64)
    dense = np.zeros(len(shapes), bool)
    while True:
        eps = ((1 - sparsity) * sizes.sum() - sizes[dense].sum()) / (raw * sizes)[~dense].sum()
        new = dense | (eps * raw > 1)
        if (new == dense).all():
            return np.where(dense, 0.0, 1 - eps * raw)
        dense = new


def test_erk_allocation(rng):
    shapes = ((3, 3, 3, 16), (3, 3, 16, 32), (512, 64), (64, 10))
    for sparsity in (0.5, 0.9, 0.98):
        got = sp.erk_sparsities(shapes, sparsity)
        np.testing.assert_allclose(got, _ref_erk(shapes, sparsity), rtol=0, atol=1e-12)
        traced = jax.jit(sp.erk_sparsities, static_argnums=0)(shapes, jnp.float32(sparsity))
        np.testing.assert_allclose(np.array(traced, np.float64), got, atol=1e-5)
    assert sp.erk_sparsities(shapes, 0.5)[0] == 0.0
    with pytest.raises(ValueError, match="sparsity is 1.2"):
        sp.erk_sparsities(shapes, 1.2)
    params = {
        f"l{i}": {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32)}
        for i, s in enumerate(shapes)
    }
    masks = sp.compute_masks(params, sparsity=0.9, scope="erk")
    for i, (s, target) in enumerate(zip(shapes, sp.erk_sparsities(shapes, 0.9), strict=True)):
        size = int(np.prod(s))
        assert size - np.asarray(masks[f"l{i}"]["kernel"]).sum() == round(target * size)
