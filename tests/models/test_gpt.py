"""The reference GPT: shapes, causality, sown intermediates, a numpy forward reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=11, max_len=8, n_layer=2, n_head=2, d_model=8, d_ff=16)


def _np_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _np_gpt(params, tokens, cfg):
    """float64 reference forward pass."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    t = tokens.shape[1]
    x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][:t][None]
    dh = cfg.d_model // cfg.n_head
    for i in range(cfg.n_layer):
        blk = p[f"block_{i}"]
        h = _np_ln(x, blk["LayerNorm_0"])

        def proj(name, h=h, blk=blk):
            y = h @ blk["attn"][name]["kernel"] + blk["attn"][name]["bias"]
            return y.reshape(*y.shape[:2], cfg.n_head, dh).transpose(0, 2, 1, 3)

        q, k, v = proj("query"), proj("key"), proj("value")
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + o @ blk["attn"]["out"]["kernel"] + blk["attn"]["out"]["bias"]
        h = _np_ln(x, blk["LayerNorm_1"])
        u = h @ blk["mlp"]["fc"]["kernel"] + blk["mlp"]["fc"]["bias"]
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + u @ blk["mlp"]["proj"]["kernel"] + blk["mlp"]["proj"]["bias"]
    return _np_ln(x, p["ln_f"]) @ p["lm_head"]["kernel"]


def test_forward_matches_numpy_and_is_causal(rng):
    tokens = rng.integers(0, 11, size=(2, 7)).astype(np.int32)
    model = GPT(CFG)
    variables = model.init(jax.random.key(0), jnp.asarray(tokens))
    apply = jax.jit(model.apply)
    logits = apply(variables, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, _np_gpt(variables["params"], tokens, CFG), atol=2e-5)
    changed = tokens.copy()
    changed[:, 4] = (changed[:, 4] + 1) % 11
    other = apply(variables, jnp.asarray(changed))
    np.testing.assert_array_equal(other[:, :4], logits[:, :4])  # the past does not see the future
    assert not np.allclose(other[:, 4:], logits[:, 4:])


def test_sown_intermediates_and_param_paths():
    model = GPT(CFG)
    x = jnp.zeros((3, 5), jnp.int32)
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, mutable=["intermediates"])
    inter = state["intermediates"]
    assert inter["block_1"]["attn"]["attn_probs"][0].shape == (3, 2, 5, 5)
    assert inter["block_1"]["attn"]["values"][0].shape == (3, 2, 5, 4)
    assert inter["block_0"]["hidden"][0].shape == (3, 5, 8)
    assert variables["params"]["lm_head"]["kernel"].shape == (8, 11)
    assert variables["params"]["block_0"]["mlp"]["fc"]["kernel"].shape == (8, 16)


def test_config_errors():
    with pytest.raises(ValueError, match="n_head = 3 must divide d_model = 8"):
        GPTConfig(n_head=3, d_model=8)
    with pytest.raises(ValueError, match="GPTConfig.n_layer must be a positive integer"):
        GPTConfig(n_layer=0)
    model = GPT(CFG)
    with pytest.raises(ValueError, match="length <= max_len = 8"):
        model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
