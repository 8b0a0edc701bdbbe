"""The BERT encoder: float64 numpy forward, padding, sown intermediates, pooling, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxcomp.distill import capture_linen, minilm_attention_loss, minilm_value_loss
from jaxcomp.models import BertConfig, BertEncoder, mean_pool_normalize

CFG = BertConfig(vocab_size=13, max_len=10, n_layers=2, n_heads=2, d_model=8, d_ff=16)


def _np_ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_bert(params, ids, mask, cfg, types=None, pool=True):
    """float64 reference BERT forward (post-LN, exact GELU, masked keys), then mean + L2."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    ids = np.asarray(ids)
    mask = np.asarray(mask).astype(bool)
    types = np.zeros_like(ids) if types is None else np.asarray(types)
    b, t = ids.shape
    emb = p["embeddings"]
    x = emb["word"]["embedding"][ids] + emb["position"]["embedding"][:t][None]
    x = _np_ln(x + emb["token_type"]["embedding"][types], emb["norm"], cfg.layer_norm_eps)
    dh = cfg.d_model // cfg.n_heads
    for i in range(cfg.n_layers):
        layer = p[f"layer_{i}"]

        def dense(h, d):
            return h @ d["kernel"] + d["bias"]

        def heads(name, x=x, layer=layer):
            return (
                dense(x, layer["attn"][name]).reshape(b, t, cfg.n_heads, dh).transpose(0, 2, 1, 3)
            )

        q, k, v = heads("query"), heads("key"), heads("value")
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        s = np.where(mask[:, None, None, :], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, cfg.d_model)
        x = _np_ln(x + dense(o, layer["attn"]["out"]), layer["attn_norm"], cfg.layer_norm_eps)
        u = dense(x, layer["mlp"]["fc"])
        u = 0.5 * u * (1.0 + erf(u / np.sqrt(2.0)))
        x = _np_ln(x + dense(u, layer["mlp"]["proj"]), layer["mlp_norm"], cfg.layer_norm_eps)
    if not pool:
        return x
    m = mask[..., None].astype(np.float64)
    e = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _init(cfg=CFG, seed=0):
    """The model and random params (numpy; random norm scales too, so a mix-up fails)."""
    model = BertEncoder(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        value = rng.normal(size=leaf.shape) * (0.5 if "embedding" in name else 0.3)
        return (value + ("scale" in name)).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(fill, shapes["params"])


def _batch(rng):
    ids = rng.integers(1, CFG.vocab_size, size=(3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 3:] = 1
    return ids, mask, types


def test_forward_matches_float64_numpy(rng):
    model, params = _init()
    ids, mask, types = _batch(rng)
    emb, feats = jax.jit(capture_linen, static_argnums=0)(
        model.apply, {"params": params}, ids, mask, types
    )
    hidden = feats["layer_1/hidden"]
    # float32 through 2 layers of width 8-16 with O(1) activations: errors ~1e-6.
    np.testing.assert_allclose(emb, np_bert(params, ids, mask, CFG, types), atol=1e-5)
    np.testing.assert_allclose(
        hidden, np_bert(params, ids, mask, CFG, types, pool=False), atol=2e-5
    )
    assert emb.shape == (3, 8) and hidden.shape == (3, 7, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    # The token types matter: without them the reference differs from emb.
    assert not np.allclose(np_bert(params, ids, mask, CFG)[0], emb[0], atol=1e-3)


def test_padding_does_not_change_real_tokens(rng):
    model, params = _init()
    ids = rng.integers(1, CFG.vocab_size, size=(1, 5)).astype(np.int32)
    apply = jax.jit(model.apply)
    alone = apply({"params": params}, ids, np.ones_like(ids))
    # Same sentence padded to length 9 with arbitrary ids at padded positions.
    padded = np.concatenate([ids, rng.integers(0, CFG.vocab_size, size=(1, 4))], 1)
    mask = np.concatenate([np.ones((1, 5)), np.zeros((1, 4))], 1).astype(np.int32)
    emb, feats = jax.jit(capture_linen, static_argnums=0)(
        model.apply, {"params": params}, padded, mask
    )
    np.testing.assert_allclose(emb, alone, atol=1e-6)
    probs = feats["layer_1/attn/attn_probs"]
    np.testing.assert_array_equal(probs[..., 5:], 0.0)  # padding keys get exactly 0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(feats["layer_1/attn/attn_scores"][..., 5:], 0.0)


def test_sown_intermediates_feed_the_minilm_losses(rng):
    teacher, t_params = _init()
    student_cfg = dataclasses.replace(CFG, n_layers=1)
    student, s_params = _init(student_cfg, seed=3)
    assert set(s_params) == {"embeddings", "layer_0"}
    ids, mask, _ = _batch(rng)
    capture = jax.jit(capture_linen, static_argnums=0)
    _, tf = capture(teacher.apply, {"params": t_params}, ids, mask)
    _, sf = capture(student.apply, {"params": s_params}, ids, mask)
    assert tf["layer_1/attn/attn_probs"].shape == (3, 2, 7, 7)
    assert tf["layer_1/attn/values"].shape == (3, 2, 7, 4)
    assert tf["layer_0/hidden"].shape == tf["embed"].shape == (3, 7, 8)
    where = mask.astype(bool)
    loss = minilm_attention_loss(
        sf["layer_0/attn/attn_probs"], tf["layer_1/attn/attn_probs"], where=where
    )
    vloss = minilm_value_loss(sf["layer_0/attn/values"], tf["layer_1/attn/values"], where=where)
    assert np.isfinite(loss) and loss > 0 and np.isfinite(vloss) and vloss > 0
    same = minilm_attention_loss(
        tf["layer_1/attn/attn_probs"], tf["layer_1/attn/attn_probs"], where=where
    )
    assert float(same) == pytest.approx(0.0, abs=1e-6)

    def objective(p):
        _, f = capture_linen(student.apply, {"params": p}, ids, mask)
        return minilm_attention_loss(
            f["layer_0/attn/attn_probs"], tf["layer_1/attn/attn_probs"], where=where
        )

    grads = jax.jit(jax.grad(objective))(s_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layer_0"]["attn"]["query"]["kernel"]).sum()) > 0


def test_mean_pool_normalize_matches_numpy(rng):
    h = rng.normal(size=(3, 4, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    out = jax.jit(mean_pool_normalize)(h, mask)
    m = mask[..., None].astype(np.float64)
    e = (h.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    ref = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(out[2], 0.0)  # no tokens: zeros, not NaN


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="n_heads = 3 must divide d_model = 8"):
        BertConfig(n_heads=3, d_model=8)
    with pytest.raises(ValueError, match="BertConfig.n_layers must be a positive integer"):
        BertConfig(n_layers=0)
    with pytest.raises(ValueError, match="layer_norm_eps must be > 0"):
        BertConfig(layer_norm_eps=0.0)
    model, params = _init()
    with pytest.raises(ValueError, match="length <= max_len = 10"):
        model.apply({"params": params}, jnp.zeros((1, 11), jnp.int32))
    with pytest.raises(
        ValueError, match=r"attention_mask must have the shape of input_ids \(1, 3\)"
    ):
        model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 4)))
    with pytest.raises(TypeError, match="integer token ids"):
        model.apply({"params": params}, jnp.zeros((1, 3), jnp.float32))
