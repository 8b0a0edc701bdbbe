"""A BERT sentence encoder in Flax Linen: post-LayerNorm transformer, mean pooling, L2 norm.

Word, position and token-type embeddings are summed and layer-normalised; then
``n_layers`` post-LayerNorm blocks ``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))``
(bidirectional multi-head self-attention with padding keys masked out, and an exact
erf-GELU MLP), as in BERT. The sentence embedding is the mean of the final hidden
states over non-padding tokens, divided by its L2 norm (sentence-transformers'
``mean`` pooling followed by ``Normalize``):

.. math::

    e = \\frac{\\sum_t m_t h_t}{\\max(\\sum_t m_t, 10^{-9})}, \\qquad
    \\mathrm{out} = \\frac{e}{\\max(\\lVert e \\rVert_2, 10^{-12})}

Parameter paths (every Dense kernel ``[in, out]``): ``embeddings/{word,position,
token_type}/embedding``, ``embeddings/norm``, and per layer ``layer_i/attn/{query,key,
value,out}``, ``layer_i/attn_norm``, ``layer_i/mlp/{fc,proj}``, ``layer_i/mlp_norm``.
Quantization and pruning rules target the kernels by default; embeddings, norms and
biases are left alone.

With ``mutable=["intermediates"]`` (or :func:`jaxcomp.distill.capture_linen`) the
model records, per layer ``layer_i``: ``attn/attn_probs`` ``[B, H, T, T]`` (softmax,
exactly 0 on padding keys), ``attn/attn_scores`` (pre-softmax, 0 on padding keys),
``attn/values`` ``[B, H, T, d_head]`` and ``hidden`` ``[B, T, d_model]`` (the layer's
output); and ``embed`` (the embedding output), the inputs of the TinyBERT and MiniLM
losses in :mod:`jaxcomp.distill`.

References: Devlin et al., BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding, 2019; Reimers et al., Sentence-BERT: Sentence Embeddings using
Siamese BERT-Networks, 2019.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of :class:`BertEncoder` (hashable, so it can be a static argument).

    The defaults are those of all-MiniLM-L6-v2; ``dataclasses.replace(config,
    n_layers=3)`` gives a 3-layer student of the same width.

    Attributes:
      vocab_size: number of tokens.
      max_len: longest sequence (number of learned positions).
      type_vocab_size: number of token types (segments).
      n_layers: number of transformer layers.
      n_heads: attention heads; must divide ``d_model``.
      d_model: hidden width.
      d_ff: hidden width of the MLP.
      layer_norm_eps: epsilon of every LayerNorm.
      dropout_rate: dropout on attention probabilities and residual branches (training).
    """

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    n_layers: int = 6
    n_heads: int = 12
    d_model: int = 384
    d_ff: int = 1536
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.0

    def __post_init__(self):
        for name in (
            "vocab_size",
            "max_len",
            "type_vocab_size",
            "n_layers",
            "n_heads",
            "d_model",
            "d_ff",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer; got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"BertConfig.n_heads = {self.n_heads} must divide d_model = {self.d_model}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0; got {self.layer_norm_eps}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"BertConfig.dropout_rate must lie in [0, 1); got {self.dropout_rate}")


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertEmbeddings(nn.Module):
    """``LN(word[ids] + position[0..T-1] + token_type[types])``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        t = input_ids.shape[1]
        x = nn.Embed(c.vocab_size, c.d_model, name="word")(input_ids)
        x = x + nn.Embed(c.max_len, c.d_model, name="position")(jnp.arange(t))[None]
        x = x + nn.Embed(c.type_vocab_size, c.d_model, name="token_type")(token_type_ids)
        return _layer_norm(c, "norm")(x)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; keys where ``mask`` is False get weight 0."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        dh = d // c.n_heads

        def heads(name):
            return nn.Dense(d, name=name)(x).reshape(b, t, c.n_heads, dh).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(dh)).astype(q.dtype)
        keys = mask[:, None, None, :]
        # finfo.min rather than -inf: a row with no valid key stays finite (uniform).
        probs = jax.nn.softmax(jnp.where(keys, scores, jnp.finfo(scores.dtype).min), axis=-1)
        probs = jnp.where(keys, probs, 0.0)
        self.sow("intermediates", "attn_scores", jnp.where(keys, scores, 0.0))
        self.sow("intermediates", "attn_probs", probs)
        self.sow("intermediates", "values", v)
        probs = nn.Dropout(c.dropout_rate, deterministic=not train)(probs)
        out = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(b, t, d)
        return nn.Dense(d, name="out")(out)


class BertMLP(nn.Module):
    """``Dense(d_ff) -> GELU (exact, erf) -> Dense(d_model)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.config.d_ff, name="fc")(x), approximate=False)
        return nn.Dense(self.config.d_model, name="proj")(x)


class BertLayer(nn.Module):
    """Post-LayerNorm BERT layer: ``x = LN(x + attn(x))``, then ``x = LN(x + mlp(x))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
        c = self.config
        drop = nn.Dropout(c.dropout_rate, deterministic=not train)
        x = x + drop(BertSelfAttention(c, name="attn")(x, mask, train=train))
        x = _layer_norm(c, "attn_norm")(x)
        x = _layer_norm(c, "mlp_norm")(x + drop(BertMLP(c, name="mlp")(x)))
        self.sow("intermediates", "hidden", x)
        return x


class BertEncoder(nn.Module):
    """BERT sentence encoder: ``input_ids [B, T] -> [B, d_model]`` unit-norm embeddings.

    Call with ``return_hidden=True`` to get the final hidden states ``[B, T, d_model]``
    instead of the pooled, normalised embeddings.

    Args (of ``__call__``):
      input_ids: ``[B, T]`` integer token ids.
      attention_mask: ``[B, T]``, nonzero/True on real tokens, 0 on padding
        (default: all real).
      token_type_ids: ``[B, T]`` segment ids (default: all 0).
      train: enables dropout (needs a ``"dropout"`` rng).
      return_hidden: return the last hidden states instead of the embeddings.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = BertConfig(vocab_size=11, max_len=8, n_layers=1, n_heads=2, d_model=8, d_ff=16)
      >>> model = BertEncoder(cfg)
      >>> ids = jnp.array([[2, 5, 3, 0], [2, 7, 9, 3]])
      >>> mask = ids != 0
      >>> variables = model.init(jax.random.key(0), ids, mask)
      >>> emb, state = model.apply(variables, ids, mask, mutable=["intermediates"])
      >>> emb.shape, state["intermediates"]["layer_0"]["attn"]["attn_probs"][0].shape
      ((2, 8), (2, 2, 4, 4))
      >>> bool(jnp.allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-6))
      True
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_len:
            raise ValueError(
                f"input_ids must be [batch, length] with length <= max_len = {c.max_len}; "
                f"got shape {input_ids.shape}"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
        for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if arr is not None and arr.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {input_ids.shape}; got {arr.shape}"
                )
        if attention_mask is None:
            mask = jnp.ones(input_ids.shape, bool)
        else:
            mask = jnp.asarray(attention_mask).astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)
        x = nn.Dropout(c.dropout_rate, deterministic=not train)(x)
        self.sow("intermediates", "embed", x)
        for i in range(c.n_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, mask, train=train)
        if return_hidden:
            return x
        return mean_pool_normalize(x, mask)


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    r"""Mean over non-padding tokens, then L2 normalisation (sentence-transformers).

    .. math::

        e = \frac{\sum_t m_t h_t}{\max(\sum_t m_t, 10^{-9})}, \qquad
        \mathrm{out} = \frac{e}{\max(\lVert e \rVert_2, 10^{-12})}

    Args:
      hidden: ``[B, T, D]`` hidden states.
      mask: ``[B, T]``, nonzero on real tokens.

    Returns:
      ``[B, D]`` unit-norm embeddings (0 for a row without tokens).

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
      >>> mean_pool_normalize(h, jnp.array([[1, 1, 0]]))
      Array([[0.6, 0.8]], dtype=float32)

    References:
      Reimers et al., Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks, 2019.
    """
    m = jnp.asarray(mask).astype(bool).astype(hidden.dtype)[..., None]
    summed = jnp.sum(hidden * m, axis=1)
    pooled = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9).astype(hidden.dtype)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12).astype(hidden.dtype)


def bert_folds(config: BertConfig) -> list:
    """The :class:`jaxcomp.ptq.Fold` list of :class:`BertEncoder`, for AWQ and SmoothQuant.

    BERT normalises after the residual add, so each LayerNorm's output feeds the
    residual stream as well as the next kernels and cannot be rescaled exactly;
    only ``attn/value -> attn/out`` folds (attention mixes tokens linearly).

    Example:
      >>> [f.prev for f in bert_folds(BertConfig(n_layers=2))]
      ['layer_0/attn/value', 'layer_1/attn/value']
    """
    from jaxcomp.ptq import Fold

    return [
        Fold(f"layer_{i}/attn/value", (f"layer_{i}/attn/out/kernel",))
        for i in range(config.n_layers)
    ]
