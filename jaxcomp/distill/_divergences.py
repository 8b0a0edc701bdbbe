"""Forward and reverse KL, soft cross-entropy and total variation between logit distributions.

Notation: ``p = softmax(z_t / T)`` (teacher), ``q = softmax(z_s / T)`` (student).
None of these functions multiplies by ``T^2``; :func:`~jaxcomp.distill.hinton_loss`
does. Entries where a distribution is exactly 0 (``-inf`` logits, e.g. a vocabulary
mask applied to both models) contribute ``0 log 0 = 0`` and give finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.distill._inputs import _prepare
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``sum_v a (log a - log b)`` over the last axis, with ``0 log 0 = 0`` and finite gradients.

    The logs are zeroed outside the support of ``a`` before they are combined, so
    ``-inf - (-inf)`` is never formed, not even in the backward pass.
    """
    a = jnp.exp(log_a)
    support = a > 0
    diff = jnp.where(support, log_a, 0.0) - jnp.where(support, log_b, 0.0)
    return jnp.sum(a * diff, axis=-1)


def _cross_entropy(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``-sum_v a log b`` over the last axis, with ``0 log 0 = 0`` and finite gradients."""
    a = jnp.exp(log_a)
    return -jnp.sum(a * jnp.where(a > 0, log_b, 0.0), axis=-1)


def kl_div(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Forward KL divergence from the teacher to the student, ``KL(p || q)``.

    .. math::

        \mathrm{KL}(p \,\|\, q) = \sum_v p_v (\log p_v - \log q_v), \qquad
        p = \mathrm{softmax}(z_t / T),\; q = \mathrm{softmax}(z_s / T)

    Mean-seeking: the student is pushed to cover every mode of the teacher. No
    ``T^2`` factor is applied (its gradient w.r.t. ``z_s`` is ``(q - p) / T``);
    use :func:`hinton_loss` or multiply by ``T**2`` yourself to keep the gradient
    scale independent of ``T``.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"`` (default) over unmasked positions, 0 if there are none;
        ``"sum_count"`` for ``(sum, count)`` to add across micro-batches or devices and
        divide once with :func:`mean_from_sum_count`; ``"none"`` for per-position
        values of shape ``[...]`` (0 where masked).

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.array([[1.0, 2.0, 3.0]])
      >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
      >>> round(float(kl_div(student, teacher, temperature=2.0)), 4)
      0.3202
      >>> float(kl_div(teacher, teacher))
      0.0

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    return _reduce(_kl(log_p, log_q), mask, reduction)


def reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Reverse KL divergence from the student to the teacher, ``KL(q || p)``.

    .. math::

        \mathrm{KL}(q \,\|\, p) = \sum_v q_v (\log q_v - \log p_v), \qquad
        p = \mathrm{softmax}(z_t / T),\; q = \mathrm{softmax}(z_s / T)

    Mode-seeking: the student may drop low-probability teacher modes, as used by
    MiniLLM for generative language models. No ``T^2`` factor is applied.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.array([[1.0, 2.0, 3.0]])
      >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
      >>> round(float(reverse_kl(student, teacher, temperature=2.0)), 4)
      0.3202

    References:
      Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, 2023.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    return _reduce(_kl(log_q, log_p), mask, reduction)


def soft_cross_entropy(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Cross-entropy of the student against the teacher's soft targets, ``H(p, q)``.

    .. math::

        H(p, q) = -\sum_v p_v \log q_v = \mathrm{KL}(p \,\|\, q) + H(p)

    Same gradient w.r.t. the student as :func:`kl_div`; the value is offset by the
    teacher entropy ``H(p)``, so it does not reach 0 at a perfect match.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.zeros((2, 4))
      >>> round(float(soft_cross_entropy(logits, logits)), 4)  # log 4
      1.3863
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    return _reduce(_cross_entropy(log_p, log_q), mask, reduction)


def total_variation(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Total variation distance between the teacher and student distributions.

    .. math::

        \mathrm{TV}(p, q) = \tfrac{1}{2} \sum_v |p_v - q_v| \in [0, 1]

    Symmetric and bounded; its gradient is that of ``|.|`` (0 where ``p_v = q_v``).

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.array([0.0, -jnp.inf])  # all mass on class 0
      >>> teacher = jnp.array([-jnp.inf, 0.0])  # all mass on class 1
      >>> float(total_variation(student, teacher))
      1.0

    References:
      Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation, 2023.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    tv = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
    return _reduce(tv, mask, reduction)
