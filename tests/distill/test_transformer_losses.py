"""TinyBERT and MiniLM losses against float64 numpy references; capture from Linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcomp.distill import (
    capture_linen,
    capture_nnx,
    layer_map,
    minilm_attention_loss,
    minilm_value_loss,
    select_layers,
    tinybert_attention_loss,
    tinybert_hidden_loss,
)
from jaxcomp.models import GPT, GPTConfig


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kl_rows(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def test_layer_map():
    assert layer_map(4, 12) == (2, 5, 8, 11)
    assert layer_map(2, 2) == (0, 1)
    with pytest.raises(ValueError, match="must be a multiple"):
        layer_map(3, 4)


def test_tinybert_losses_match_numpy(rng):
    s = [rng.normal(size=(2, 2, 4, 4)).astype(np.float32) for _ in range(2)]
    t = [rng.normal(size=(2, 2, 4, 4)).astype(np.float32) for _ in range(4)]
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
    got = jax.jit(lambda s, t: tinybert_attention_loss(s, t, where=mask))(s, t)
    ref = 0.0
    for i, j in enumerate((1, 3)):
        per = ((s[i].astype(np.float64) - t[j]) ** 2).mean(axis=(1, 3))
        ref += per[mask].mean()
    np.testing.assert_allclose(got, ref, rtol=1e-5)

    hs = [rng.normal(size=(2, 4, 3)).astype(np.float32) for _ in range(2)]
    ht = [rng.normal(size=(2, 4, 5)).astype(np.float32) for _ in range(2)]
    w = rng.normal(size=(3, 5)).astype(np.float32)
    got = tinybert_hidden_loss(hs, ht, w, mapping=(1, 0), where=mask)
    ref = sum(
        (((hs[i].astype(np.float64) @ w - ht[j]) ** 2).mean(-1))[mask].mean()
        for i, j in ((0, 1), (1, 0))
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_minilm_attention_and_value_losses_match_numpy(rng):
    b, h, t = 2, 2, 5
    causal = np.tril(np.ones((t, t), bool))
    zs, zt = rng.normal(size=(2, b, h, t, t))
    ps = _np_softmax(np.where(causal, zs, -np.inf))
    pt = _np_softmax(np.where(causal, zt, -np.inf))
    mask = np.ones((b, t), bool)
    mask[1, 3:] = False
    got = minilm_attention_loss(ps.astype(np.float32), pt.astype(np.float32), where=mask)
    ref = _np_kl_rows(pt, ps).mean(1)[mask].mean()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    grad = jax.grad(lambda p: minilm_attention_loss(p, pt.astype(np.float32)))(
        ps.astype(np.float32)
    )
    assert np.all(np.isfinite(grad))

    vs = rng.normal(size=(b, h, t, 3))
    vt = rng.normal(size=(b, h, t, 6))

    def vr(v):
        z = v @ np.swapaxes(v, -1, -2) / np.sqrt(v.shape[-1])
        allowed = causal[None, None] & mask[:, None, None, :]
        return _np_softmax(np.where(allowed, z, -np.inf))

    got = jax.jit(lambda a, c: minilm_value_loss(a, c, causal=True, where=mask))(
        vs.astype(np.float32), vt.astype(np.float32)
    )
    ref = _np_kl_rows(vr(vt), vr(vs)).mean(1)[mask].mean()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    grad = jax.grad(lambda a: minilm_value_loss(a, vt.astype(np.float32), where=mask))(
        vs.astype(np.float32)
    )
    assert np.all(np.isfinite(grad)) and not np.any(grad[1, :, 3:])


def test_capture_gpt_and_distill_from_intermediates():
    cfg_t = GPTConfig(vocab_size=13, max_len=8, n_layer=4, n_head=2, d_model=16, d_ff=32)
    cfg_s = GPTConfig(vocab_size=13, max_len=8, n_layer=2, n_head=2, d_model=8, d_ff=16)
    x = jnp.asarray(np.arange(12).reshape(2, 6) % 13, jnp.int32)
    teacher, student = GPT(cfg_t), GPT(cfg_s)
    vt, vs = teacher.init(jax.random.key(0), x), student.init(jax.random.key(1), x)
    _, ft = capture_linen(teacher.apply, vt, x)
    logits, fs = capture_linen(student.apply, vs, x)
    assert logits.shape == (2, 6, 13)
    probs_t = select_layers(ft, r"block_\d+/attn/attn_probs$")
    assert len(probs_t) == 4 and probs_t[0].shape == (2, 2, 6, 6)
    np.testing.assert_allclose(np.asarray(probs_t[0]).sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(np.asarray(probs_t[0]), 1) == 0)

    def loss(params):
        _, f = capture_linen(student.apply, {"params": params}, x)
        attn = tinybert_attention_loss(
            select_layers(f, r"attn/attn_scores$"), select_layers(ft, r"attn/attn_scores$")
        )
        value = minilm_value_loss(f["block_1/attn/values"], ft["block_3/attn/values"], causal=True)
        return attn + value

    grads = jax.jit(jax.grad(loss))(vs["params"])
    assert float(jnp.abs(grads["block_0"]["attn"]["query"]["kernel"]).sum()) > 0
    hidden = student.apply(vs, x, return_hidden=True)
    np.testing.assert_allclose(hidden, fs["final_hidden"], rtol=1e-6)
    np.testing.assert_allclose(
        hidden @ vs["params"]["lm_head"]["kernel"], logits, rtol=1e-5, atol=1e-6
    )


def test_capture_nnx_pops_intermediates():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 4, rngs=rngs)
            self.b = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.a(x))
            self.sow(nnx.Intermediate, "h", h)
            return self.b(h)

    net = Net(nnx.Rngs(0))
    x = jnp.ones((5, 3))
    out, feats = capture_nnx(net, x)
    np.testing.assert_allclose(feats["h"], nnx.relu(net.a(x)), rtol=1e-6)
    _, again = capture_nnx(net, x)
    assert set(again) == {"h"}  # popped: values do not pile up
    with pytest.raises(ValueError, match="no captured feature matches"):
        select_layers(feats, "block")
