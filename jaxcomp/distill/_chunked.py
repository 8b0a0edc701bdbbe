"""Chunked divergences over tokens: logits computed chunk by chunk from hidden states.

For a language model with ``N = B * T`` tokens and a vocabulary of ``V``, the
float32 logits of student and teacher take ``2 * N * V * 4`` bytes, and their
gradients as much again. :func:`chunked_kl` never forms them: it takes the final
hidden states and the unembedding (output projection) matrices, scans over
chunks of ``chunk_size`` tokens with :func:`jax.lax.scan`, and wraps each chunk's
body in :func:`jax.checkpoint` so that the backward pass recomputes the chunk's
logits instead of storing them. Peak memory holds ``O(chunk_size * V)`` logits.

Taking logits chunks instead of hidden states would not save memory: the full
logits would already exist before the loss sees them.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxcomp.distill._divergences import _kl
from jaxcomp.distill._inputs import _check_logits, _check_scalar, _check_temperature, _check_where
from jaxcomp.distill._jsd import _jsd_interior
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce

Divergence = Literal["forward", "reverse", "jsd"]
_DIVERGENCES = ("forward", "reverse", "jsd")


def _check_unembed(name: str, w: ArrayLike, width: int) -> jax.Array:
    w = _check_logits(name, w)
    if w.ndim != 2 or w.shape[0] != width:
        raise ValueError(
            f"{name} has shape {w.shape}; it must be [D, V] with D = {width}, the hidden width"
        )
    return w


def _check_bias(name: str, b: ArrayLike | None, vocab: int) -> jax.Array:
    if b is None:
        return jnp.zeros((vocab,), jnp.float32)
    b = _check_logits(name, b)
    if b.shape != (vocab,):
        raise ValueError(f"{name} has shape {b.shape}; it must be [V] = ({vocab},)")
    return b.astype(jnp.float32)


def chunked_kl(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_unembed: ArrayLike,
    *,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    divergence: Divergence = "forward",
    beta: float = 0.5,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = 256,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""KL between student and teacher token distributions, logits formed chunk by chunk.

    .. math::

        z_s = h_s W_s + b_s, \quad z_t = h_t W_t + b_t, \qquad
        \mathrm{forward}: \mathrm{KL}(p \,\|\, q), \quad
        \mathrm{reverse}: \mathrm{KL}(q \,\|\, p), \quad
        \mathrm{jsd}: \beta\,\mathrm{KL}(p \,\|\, M) + (1-\beta)\,\mathrm{KL}(q \,\|\, M)

    with ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``, ``M = beta p + (1 - beta) q``.
    Same values and gradients as :func:`kl_div`, :func:`reverse_kl` and
    :func:`generalized_jsd` applied to the full logits, to float32 rounding; the
    tokens are flattened, padded to a multiple of ``chunk_size`` (padding is masked)
    and scanned. Each chunk's matmuls run with float32 accumulation. No ``T^2``.

    Args:
      student_hidden: ``[..., D_s]`` final student hidden states (after the last norm).
      student_unembed: ``[D_s, V]`` student output projection (for tied embeddings,
        pass ``embedding.T``); receives gradients.
      teacher_hidden: ``[..., D_t]`` teacher hidden states, same leading shape;
        gradients are stopped (bf16 is fine).
      teacher_unembed: ``[D_t, V]`` teacher output projection; gradients are stopped.
      student_bias: optional ``[V]`` student logit bias.
      teacher_bias: optional ``[V]`` teacher logit bias.
      divergence: ``"forward"`` (default), ``"reverse"`` or ``"jsd"`` (generalized JSD).
      beta: mixture weight for ``"jsd"``, strictly inside ``(0, 1)``.
      temperature: softmax temperature ``T > 0``; may be traced.
      where: optional boolean mask of the leading shape ``[...]``.
      chunk_size: tokens per chunk (static); memory ``~ chunk_size * V`` floats per model.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcomp.distill import kl_div
      >>> ks = jax.random.split(jax.random.key(0), 4)
      >>> hs, ht = jax.random.normal(ks[0], (2, 7, 4)), jax.random.normal(ks[1], (2, 7, 6))
      >>> ws, wt = jax.random.normal(ks[2], (4, 50)), jax.random.normal(ks[3], (6, 50))
      >>> loss = chunked_kl(hs, ws, ht, wt, chunk_size=4)
      >>> bool(jnp.allclose(loss, kl_div(hs @ ws, ht @ wt), rtol=1e-5))
      True

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015;
      Chen et al., Training Deep Nets with Sublinear Memory Cost, 2016.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES}; got {divergence!r}")
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    b = None
    if divergence == "jsd":
        b = _check_scalar("beta", beta, lambda x: 0.0 < x < 1.0, "strictly inside (0, 1)")
    hs = _check_logits("student_hidden", student_hidden)
    ht = _check_logits("teacher_hidden", teacher_hidden)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden has shape {hs.shape} and teacher_hidden has shape {ht.shape}; "
            "their leading (token) shapes must be equal"
        )
    ws = _check_unembed("student_unembed", student_unembed, hs.shape[-1])
    wt = _check_unembed("teacher_unembed", teacher_unembed, ht.shape[-1])
    if ws.shape[1] != wt.shape[1]:
        raise ValueError(
            f"vocabulary sizes differ: student_unembed has {ws.shape[1]} columns and "
            f"teacher_unembed has {wt.shape[1]}; they must be equal"
        )
    vocab = ws.shape[1]
    bs = _check_bias("student_bias", student_bias, vocab)
    bt = jax.lax.stop_gradient(_check_bias("teacher_bias", teacher_bias, vocab))
    lead = hs.shape[:-1]
    mask = _check_where(where, lead)
    temperature = _check_temperature(temperature)
    wt = jax.lax.stop_gradient(wt)

    n = int(np.prod(lead, dtype=np.int64))
    chunk = int(min(chunk_size, max(n, 1)))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    keep = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
    keep = jnp.pad(keep, (0, pad))

    def chunks(h):
        h = jnp.pad(h.reshape(n, h.shape[-1]), ((0, pad), (0, 0)))
        return h.reshape(n_chunks, chunk, h.shape[-1])

    hs_c = chunks(hs)
    ht_c = chunks(jax.lax.stop_gradient(ht))
    keep_c = keep.reshape(n_chunks, chunk)

    @jax.checkpoint
    def per_chunk(ws, bs, h_s, h_t, k):
        h_s = jnp.where(k[:, None], h_s, jnp.zeros((), h_s.dtype))
        h_t = jnp.where(k[:, None], h_t, jnp.zeros((), h_t.dtype))
        z_s = jnp.matmul(h_s.astype(ws.dtype), ws, preferred_element_type=jnp.float32) + bs
        z_t = jnp.matmul(h_t.astype(wt.dtype), wt, preferred_element_type=jnp.float32) + bt
        log_q = jax.nn.log_softmax(z_s.astype(jnp.float32) / temperature, axis=-1)
        log_p = jax.nn.log_softmax(z_t.astype(jnp.float32) / temperature, axis=-1)
        if divergence == "forward":
            values = _kl(log_p, log_q)
        elif divergence == "reverse":
            values = _kl(log_q, log_p)
        else:
            values = _jsd_interior(log_p, log_q, b)
        return jnp.where(k, values, 0.0)

    def body(carry, xs):
        return carry, per_chunk(ws, bs, *xs)

    _, values = jax.lax.scan(body, None, (hs_c, ht_c, keep_c))
    per_position = values.reshape(-1)[:n].reshape(lead)
    return _reduce(per_position, mask, reduction)
