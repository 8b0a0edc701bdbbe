"""Transformer feature losses: TinyBERT attention/hidden MSE with a layer map, MiniLM relations.

Attention tensors are ``[B, H, T, T]`` (query then key positions), values
``[B, H, T, d_head]`` and hidden states ``[B, T, D]``, as the reference GPT sows
them. ``where`` is a ``[B, T]`` mask over positions: masked query rows are
excluded from the mean, and MiniLM's value relations also drop masked keys.
Losses are means over the kept positions (``reduction`` as for :func:`kl_div`),
summed over mapped layer pairs; the teacher's gradient is stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.distill._divergences import _kl
from jaxcomp.distill._features import Projection, hint_mse
from jaxcomp.distill._inputs import _check_logits, _check_where
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce


def layer_map(n_student: int, n_teacher: int) -> tuple[int, ...]:
    r"""TinyBERT's uniform layer map: student layer ``m`` learns from teacher layer ``g(m)``.

    .. math::

        g(m) = m \cdot N / M \quad (1\text{-based}), \qquad
        \text{0-based: } g(i) = (i + 1) N / M - 1

    Args:
      n_student: student layers ``M``.
      n_teacher: teacher layers ``N``, a multiple of ``M``.

    Returns:
      A tuple of ``M`` 0-based teacher layer indices.

    Example:
      >>> layer_map(4, 12)
      (2, 5, 8, 11)

    References:
      Jiao et al., TinyBERT: Distilling BERT for Natural Language Understanding, 2020.
    """
    if not (isinstance(n_student, int) and isinstance(n_teacher, int)) or n_student < 1:
        raise ValueError(f"layer counts must be positive integers; got {n_student}, {n_teacher}")
    if n_teacher % n_student:
        raise ValueError(
            f"n_teacher = {n_teacher} must be a multiple of n_student = {n_student} "
            "for the uniform layer map; pass your own mapping instead"
        )
    return tuple((i + 1) * (n_teacher // n_student) - 1 for i in range(n_student))


def _pairs(student: Sequence, teacher: Sequence, mapping: Sequence[int] | None) -> list:
    mapping = layer_map(len(student), len(teacher)) if mapping is None else tuple(mapping)
    if len(mapping) != len(student) or any(not 0 <= j < len(teacher) for j in mapping):
        raise ValueError(
            f"mapping {mapping} must give one teacher layer in [0, {len(teacher)}) for each "
            f"of the {len(student)} student layers"
        )
    return [(student[i], teacher[j]) for i, j in enumerate(mapping)]


def _attn_pair(s: ArrayLike, t: ArrayLike, name: str) -> tuple[jax.Array, jax.Array]:
    s = _check_logits(f"student_{name}", s).astype(jnp.float32)
    t = jax.lax.stop_gradient(_check_logits(f"teacher_{name}", t).astype(jnp.float32))
    if s.ndim != 4 or s.shape[:3] != t.shape[:3] or s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student_{name} {s.shape} and teacher_{name} {t.shape} must be [B, H, T, .] "
            "with equal B, H (heads) and T"
        )
    return s, t


def _sum_layers(values: list[LossOutput], reduction: Reduction) -> LossOutput:
    if reduction == "sum_count":
        return sum(v[0] for v in values), values[0][1]
    return sum(values)


def tinybert_attention_loss(
    student_attn: Sequence[ArrayLike],
    teacher_attn: Sequence[ArrayLike],
    *,
    mapping: Sequence[int] | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""TinyBERT attention loss: MSE between mapped layers' attention matrices.

    .. math::

        L = \sum_{m} \frac{1}{H T} \sum_{h, k} \big(A^S_{m,h,q,k} - A^T_{g(m),h,q,k}\big)^2

    averaged over query positions ``q`` (and the batch). TinyBERT uses the
    pre-softmax scores with masked entries set to 0 (the GPT's ``attn_scores``);
    probabilities (``attn_probs``) work the same way.

    Args:
      student_attn: per student layer, ``[B, H, T, T]``.
      teacher_attn: per teacher layer, ``[B, H, T, T]`` (same heads); gradients stopped.
      mapping: teacher layer index per student layer; default :func:`layer_map`.
      where: optional ``[B, T]`` mask of query positions.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"`` (``[B, T]``), per layer, summed.

    Returns:
      A float32 scalar, a ``(sum, count)`` pair, or a ``[B, T]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.zeros((1, 2, 3, 3))
      >>> float(tinybert_attention_loss([a], [a + 1.0, a + 0.5]))  # layer 0 <- teacher 1
      0.25

    References:
      Jiao et al., TinyBERT: Distilling BERT for Natural Language Understanding, 2020.
    """
    values = []
    for s, t in _pairs(student_attn, teacher_attn, mapping):
        s, t = _attn_pair(s, t, "attn")
        if s.shape != t.shape:
            raise ValueError(f"attention shapes differ: student {s.shape}, teacher {t.shape}")
        mask = _check_where(where, (s.shape[0], s.shape[2]))
        per = jnp.mean((s - t) ** 2, axis=(1, 3))  # [B, T]
        values.append(_reduce(per, mask, reduction))
    return _sum_layers(values, reduction)


def tinybert_hidden_loss(
    student_hidden: Sequence[ArrayLike],
    teacher_hidden: Sequence[ArrayLike],
    projection: Projection = None,
    *,
    mapping: Sequence[int] | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""TinyBERT hidden-state loss: MSE between ``h^S W_h`` and the mapped teacher layer.

    .. math::

        L = \sum_m \frac{1}{D_t} \sum_d \big((h^S_m W_h)_d - h^T_{g(m), d}\big)^2

    averaged over positions; one learned ``W_h`` ``[D_s, D_t]`` shared by all layers.

    Args:
      student_hidden: per student layer, ``[B, T, D_s]``.
      teacher_hidden: per teacher layer, ``[B, T, D_t]``; gradients stopped.
      projection: ``None`` (``D_s == D_t``), the ``[D_s, D_t]`` matrix or a callable.
      mapping: teacher layer per student layer; default :func:`layer_map`.
      where: optional ``[B, T]`` mask.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``.

    Returns:
      A float32 scalar, a ``(sum, count)`` pair, or a ``[B, T]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> float(tinybert_hidden_loss([jnp.zeros((1, 2, 3))], [jnp.ones((1, 2, 3))]))
      1.0

    References:
      Jiao et al., TinyBERT: Distilling BERT for Natural Language Understanding, 2020.
    """
    values = [
        hint_mse(s, t, projection, where=where, reduction=reduction)
        for s, t in _pairs(student_hidden, teacher_hidden, mapping)
    ]
    return _sum_layers(values, reduction)


def _relation_kl(
    log_t: jax.Array, log_s: jax.Array, mask: jax.Array | None, reduction: Reduction
) -> LossOutput:
    per = jnp.mean(_kl(log_t, log_s), axis=1)  # [B, H, T] -> mean over heads: [B, T]
    return _reduce(per, mask, reduction)


def minilm_attention_loss(
    student_probs: ArrayLike,
    teacher_probs: ArrayLike,
    *,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""MiniLM self-attention distribution transfer: KL between last-layer attention rows.

    .. math::

        L = \frac{1}{H T} \sum_{h, q} \mathrm{KL}\big(A^T_{h,q,\cdot} \,\|\, A^S_{h,q,\cdot}\big)

    Student probabilities are clamped at ``1e-30`` inside the log so that entries
    that are exactly 0 in both (causal or padding masks) give finite gradients.

    Args:
      student_probs: ``[B, H, T, T]`` attention probabilities (rows sum to 1).
      teacher_probs: ``[B, H, T, T]`` with the same heads; gradients stopped.
      where: optional ``[B, T]`` mask of query positions.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``.

    Returns:
      A float32 scalar, a ``(sum, count)`` pair, or a ``[B, T]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.full((1, 1, 2, 2), 0.5)
      >>> float(minilm_attention_loss(a, a))
      0.0

    References:
      Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic
      Compression of Pre-Trained Transformers, 2020.
    """
    s, t = _attn_pair(student_probs, teacher_probs, "probs")
    if s.shape != t.shape:
        raise ValueError(f"attention shapes differ: student {s.shape}, teacher {t.shape}")
    mask = _check_where(where, (s.shape[0], s.shape[2]))
    log_s = jnp.log(jnp.maximum(s, 1e-30))
    log_t = jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)
    return _relation_kl(log_t, log_s, mask, reduction)


def _value_relation(v: jax.Array, keep: jax.Array | None, causal: bool) -> jax.Array:
    t = v.shape[2]
    scores = jnp.einsum("bhqd,bhkd->bhqk", v, v) / jnp.sqrt(jnp.float32(v.shape[-1]))
    allowed = jnp.ones((t, t), bool)
    if causal:
        allowed = jnp.tril(allowed)
    allowed = allowed[None, None]
    if keep is not None:  # every row keeps its own key, so no row is empty
        allowed = (allowed & keep[:, None, None, :]) | jnp.eye(t, dtype=bool)
    return jax.nn.log_softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)


def minilm_value_loss(
    student_values: ArrayLike,
    teacher_values: ArrayLike,
    *,
    causal: bool = False,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""MiniLM value-relation transfer: KL between softmax-normalised value-value products.

    .. math::

        VR = \mathrm{softmax}\big(V V^\top / \sqrt{d_h}\big), \qquad
        L = \frac{1}{H T} \sum_{h, q} \mathrm{KL}\big(VR^T_{h,q,\cdot} \,\|\, VR^S_{h,q,\cdot}\big)

    The head widths ``d_h`` may differ between student and teacher; the head counts
    must match. ``causal=True`` restricts each row to keys ``k <= q`` (decoder LMs);
    keys masked by ``where`` are dropped from every row.

    Args:
      student_values: ``[B, H, T, d_s]`` last-layer values.
      teacher_values: ``[B, H, T, d_t]``; gradients stopped.
      causal: mask future keys.
      where: optional ``[B, T]`` mask of positions (rows and keys).
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``.

    Returns:
      A float32 scalar, a ``(sum, count)`` pair, or a ``[B, T]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> v = jnp.arange(12.0).reshape(1, 1, 3, 4) / 10
      >>> float(minilm_value_loss(v, v, causal=True))
      0.0

    References:
      Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic
      Compression of Pre-Trained Transformers, 2020.
    """
    s, t = _attn_pair(student_values, teacher_values, "values")
    mask = _check_where(where, (s.shape[0], s.shape[2]))
    if mask is not None:
        s = jnp.where(mask[:, None, :, None], s, 0.0)
        t = jnp.where(mask[:, None, :, None], t, 0.0)
    log_s = _value_relation(s, mask, causal)
    log_t = _value_relation(t, mask, causal)
    return _relation_kl(log_t, log_s, mask, reduction)
