"""A small GPT-style causal transformer language model in Flax Linen.

Token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal
multi-head self-attention, then a GELU MLP, each with a residual), a final
LayerNorm and an untied output projection ``lm_head`` (``[d_model, vocab_size]``,
no bias). Every Dense kernel is ``[in, out]``: ``block_i/attn/{query,key,value,out}``
and ``block_i/mlp/{fc,proj}``, the leaves quantization and pruning rules target.

With ``mutable=["intermediates"]`` the model records (``sow``), per block
``block_i``: ``attn/attn_probs`` ``[B, H, T, T]`` (softmax, 0 above the diagonal),
``attn/attn_scores`` (pre-softmax, 0 where masked, as TinyBERT uses),
``attn/values`` ``[B, H, T, d_head]`` and ``hidden`` ``[B, T, d_model]`` (the block's
output); and ``embed`` (the embedding output) and ``final_hidden`` (after the last
LayerNorm, the input of ``lm_head``, for :func:`jaxcomp.distill.chunked_kl`).

References: Radford et al., Language Models are Unsupervised Multitask Learners, 2019;
Vaswani et al., Attention Is All You Need, 2017.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of :class:`GPT` (hashable, so it can be a static argument).

    Attributes:
      vocab_size: number of tokens.
      max_len: longest sequence (number of learned positions).
      n_layer: number of transformer blocks.
      n_head: attention heads; must divide ``d_model``.
      d_model: residual width.
      d_ff: hidden width of the MLP.
      dropout_rate: dropout on attention probabilities and residual branches (training).
    """

    vocab_size: int = 256
    max_len: int = 128
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    dropout_rate: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer; got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.n_head = {self.n_head} must divide d_model = {self.d_model}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"GPTConfig.dropout_rate must lie in [0, 1); got {self.dropout_rate}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query/key/value/out projections."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        dh = d // c.n_head

        def heads(name):
            return nn.Dense(d, name=name)(x).reshape(b, t, c.n_head, dh).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(dh)).astype(q.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        self.sow("intermediates", "attn_scores", jnp.where(causal, scores, 0.0))
        self.sow("intermediates", "attn_probs", probs)
        self.sow("intermediates", "values", v)
        probs = nn.Dropout(c.dropout_rate, deterministic=not train)(probs)
        out = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(b, t, d)
        return nn.Dense(d, name="out")(out)


class MLPBlock(nn.Module):
    """``Dense(d_ff) -> GELU -> Dense(d_model)``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.config.d_ff, name="fc")(x))
        return nn.Dense(self.config.d_model, name="proj")(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        drop = nn.Dropout(self.config.dropout_rate, deterministic=not train)
        x = x + drop(CausalSelfAttention(self.config, name="attn")(nn.LayerNorm()(x), train=train))
        x = x + drop(MLPBlock(self.config, name="mlp")(nn.LayerNorm()(x)))
        self.sow("intermediates", "hidden", x)
        return x


class GPT(nn.Module):
    """Causal transformer LM: ``tokens [B, T] int -> logits [B, T, vocab_size]``.

    Call with ``return_hidden=True`` to get the final hidden states ``[B, T, d_model]``
    instead (the output projection is ``params["lm_head"]["kernel"]``), e.g. for
    :func:`jaxcomp.distill.chunked_kl`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = GPT(GPTConfig(vocab_size=11, max_len=8, n_layer=1, n_head=2, d_model=8, d_ff=16))
      >>> tokens = jnp.zeros((2, 5), jnp.int32)
      >>> variables = model.init(jax.random.key(0), tokens)
      >>> logits, state = model.apply(variables, tokens, mutable=["intermediates"])
      >>> logits.shape, state["intermediates"]["block_0"]["attn"]["attn_probs"][0].shape
      ((2, 5, 11), (2, 2, 5, 5))
    """

    config: GPTConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array, *, train: bool = False, return_hidden: bool = False
    ) -> jax.Array:
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] > c.max_len:
            raise ValueError(
                f"tokens must be [batch, length] with length <= max_len = {c.max_len}; "
                f"got shape {tokens.shape}"
            )
        x = nn.Embed(c.vocab_size, c.d_model, name="wte")(tokens)
        x = x + nn.Embed(c.max_len, c.d_model, name="wpe")(jnp.arange(tokens.shape[1]))[None]
        x = nn.Dropout(c.dropout_rate, deterministic=not train)(x)
        self.sow("intermediates", "embed", x)
        for i in range(c.n_layer):
            x = Block(c, name=f"block_{i}")(x, train=train)
        x = nn.LayerNorm(name="ln_f")(x)
        self.sow("intermediates", "final_hidden", x)
        if return_hidden:
            return x
        return nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x)


def gpt_folds(config: GPTConfig) -> list:
    """The :class:`jaxcomp.ptq.Fold` list of :class:`GPT`, for AWQ and SmoothQuant.

    Per block: ``LayerNorm_0 -> attn/{query,key,value}``, ``attn/value -> attn/out``
    (attention mixes tokens linearly, so value's output channels reach ``out``
    unchanged) and ``LayerNorm_1 -> mlp/fc``; then ``ln_f -> lm_head``. ``mlp/proj``
    reads a GELU output, which no scale folds through.

    Example:
      >>> [f.prev for f in gpt_folds(GPTConfig(n_layer=1))]
      ['block_0/LayerNorm_0', 'block_0/attn/value', 'block_0/LayerNorm_1', 'ln_f']
    """
    from jaxcomp.ptq import Fold

    folds = []
    for i in range(config.n_layer):
        b = f"block_{i}"
        qkv = tuple(f"{b}/attn/{n}/kernel" for n in ("query", "key", "value"))
        folds += [
            Fold(f"{b}/LayerNorm_0", qkv),
            Fold(f"{b}/attn/value", (f"{b}/attn/out/kernel",)),
            Fold(f"{b}/LayerNorm_1", (f"{b}/mlp/fc/kernel",)),
        ]
    return [*folds, Fold("ln_f", ("lm_head/kernel",))]
