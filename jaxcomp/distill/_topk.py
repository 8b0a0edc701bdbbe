"""KL from a teacher's top-k log-probabilities: renormalised top-k, or top-k plus a tail bucket.

Storing ``k`` teacher log-probs and indices per token instead of ``V`` logits makes
offline distillation of large-vocabulary models affordable. Notation:
``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``, ``S`` the teacher's top-k set.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxcomp.distill._divergences import _kl
from jaxcomp.distill._inputs import _check_logits, _check_temperature, _check_where
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce

_MODES = ("renormalize", "tail")


def teacher_topk(
    teacher_logits: ArrayLike, k: int, *, temperature: ArrayLike = 1.0
) -> tuple[jax.Array, jax.Array]:
    r"""The teacher's ``k`` largest log-probabilities at temperature ``T`` and their indices.

    .. math::

        \log p = \mathrm{log\_softmax}(z_t / T), \qquad
        (\log p_S, S) = \mathrm{top}_k(\log p)

    This is what to store for offline distillation with :func:`topk_kl`; the
    log-probs are normalised over the full vocabulary, so the tail mass
    ``1 - sum_S p`` stays recoverable.

    Args:
      teacher_logits: ``[..., V]`` teacher logits (any float dtype; float32 math).
      k: number of entries to keep, ``1 <= k <= V`` (static).
      temperature: softmax temperature ``T > 0``; may be traced.

    Returns:
      ``(log_probs, indices)``: float32 and int32 arrays of shape ``[..., k]``, sorted
      by decreasing probability.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs, indices = teacher_topk(jnp.array([0.0, 3.0, 1.0]), 2)
      >>> indices.tolist()
      [1, 2]
    """
    logits = _check_logits("teacher_logits", teacher_logits)
    vocab = logits.shape[-1]
    if not isinstance(k, int | np.integer) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}] (the vocabulary size); got {k!r}")
    temperature = _check_temperature(temperature)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    values, indices = jax.lax.top_k(jax.lax.stop_gradient(log_probs), int(k))
    return values, indices.astype(jnp.int32)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends; ``-inf`` at 0."""
    x = jnp.minimum(x, 0.0)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _tail_log_masses(
    scaled: jax.Array, teacher: jax.Array, indices: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``[..., 1]`` logs of the mass outside ``indices``: the teacher's and the student's.

    The teacher's is ``log(1 - sum_S p)``, taken as 0 mass (``-inf``) below ``k`` float32
    ulps, the rounding level of the sum (so ``k = V`` has no bucket). The student's is
    exact, ``-inf`` with a finite gradient where every entry outside ``S`` is ``-inf``.
    """
    k = teacher.shape[-1]
    log_sum = jax.nn.logsumexp(teacher, axis=-1, keepdims=True)
    rounding = float(np.log1p(-k * np.finfo(np.float32).eps))
    teacher_tail = jnp.where(log_sum > rounding, -jnp.inf, _log1mexp(log_sum))

    in_topk = jnp.put_along_axis(
        jnp.zeros(scaled.shape, bool), indices, True, axis=-1, inplace=False
    )
    others = jnp.where(in_topk, -jnp.inf, scaled)
    dead = jnp.all(jnp.isneginf(others), axis=-1, keepdims=True)
    student_tail = jax.nn.logsumexp(
        jnp.where(dead, 0.0, others), axis=-1, keepdims=True
    ) - jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    return teacher_tail, jnp.where(dead, -jnp.inf, student_tail)


def topk_kl(
    student_logits: ArrayLike,
    teacher_log_probs: ArrayLike,
    teacher_indices: ArrayLike,
    *,
    mode: Literal["renormalize", "tail"] = "renormalize",
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Forward KL from the teacher's top-k log-probs, renormalised or with a tail bucket.

    ``mode="renormalize"`` compares both distributions restricted to ``S`` and
    renormalised there; ``mode="tail"`` adds one bucket holding the mass outside
    ``S`` (the student's exact tail mass; the teacher's ``1 - sum_S p``):

    .. math::

        \mathrm{renormalize}: \mathrm{KL}(\tilde p \,\|\, \tilde q), \quad
        \tilde p_i = \frac{p_i}{\sum_{j \in S} p_j}\ (i \in S); \qquad
        \mathrm{tail}: \mathrm{KL}\big([p_S, p_{\bar S}] \,\|\, [q_S, q_{\bar S}]\big)

    Both are biased. By the chain rule (``p_tail = 1 - P_p(S)``),

    .. math::

        \mathrm{KL}(p \,\|\, q) = \mathrm{KL}_\mathrm{tail}
            + p_\mathrm{tail}\, \mathrm{KL}(p_{\cdot | \bar S} \,\|\, q_{\cdot | \bar S})
            \ge \mathrm{KL}_\mathrm{tail}
            = \mathrm{KL}\big([P_p(S), p_\mathrm{tail}] \,\|\, [P_q(S), q_\mathrm{tail}]\big)
            + P_p(S)\, \mathrm{KL}_\mathrm{renormalize}

    so the tail-bucket loss is a lower bound of the full KL and so is
    ``P_p(S) * KL_renormalize`` (the renormalised loss alone can exceed it); both
    modes equal the full KL when ``k = V``. The tail bucket also penalises a student
    that puts too much mass outside ``S``, which renormalising ignores. No ``T^2``.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (float32 math).
      teacher_log_probs: ``[..., k]`` teacher log-probs at the same temperature,
        normalised over the full vocabulary (as returned by :func:`teacher_topk`);
        gradients are stopped.
      teacher_indices: ``[..., k]`` distinct vocabulary indices of those entries; values
        at masked positions are ignored (``-1`` padding is fine there).
      mode: ``"renormalize"`` (default) or ``"tail"``.
      temperature: temperature ``T > 0`` applied to the student logits; the teacher's
        log-probs must already be at ``T``. May be traced.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcomp.distill import kl_div
      >>> teacher, student = jnp.array([[2.0, 1.0, 0.0, -1.0]]), jnp.zeros((1, 4))
      >>> log_probs, indices = teacher_topk(teacher, 4)  # k = V: the full KL
      >>> full = kl_div(student, teacher)
      >>> bool(jnp.allclose(topk_kl(student, log_probs, indices, mode="tail"), full))
      True
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
    student = _check_logits("student_logits", student_logits).astype(jnp.float32)
    teacher = _check_logits("teacher_log_probs", teacher_log_probs).astype(jnp.float32)
    indices = jnp.asarray(teacher_indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"teacher_indices must have an integer dtype; got {indices.dtype}")
    vocab, k = student.shape[-1], teacher.shape[-1]
    if indices.shape != teacher.shape or teacher.shape[:-1] != student.shape[:-1] or k > vocab:
        raise ValueError(
            f"teacher_log_probs {teacher.shape} and teacher_indices {indices.shape} must both "
            f"be [..., k] with k <= V and the leading shape of student_logits {student.shape}"
        )
    mask = _check_where(where, student.shape[:-1])
    if not isinstance(indices, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
        values = np.asarray(indices) if mask is None else np.asarray(indices)[np.asarray(mask)]
        if values.size and (values.min() < 0 or values.max() >= vocab):
            raise ValueError(
                f"teacher_indices must lie in [0, {vocab}) at unmasked positions; got values "
                f"in [{values.min()}, {values.max()}]"
            )
    teacher = jax.lax.stop_gradient(teacher)
    if mask is not None:
        student = jnp.where(mask[..., None], student, 0.0)
        teacher = jnp.where(mask[..., None], teacher, 0.0)
        indices = jnp.where(mask[..., None], indices, jnp.arange(k, dtype=indices.dtype))

    scaled = student / _check_temperature(temperature)
    picked = jnp.take_along_axis(scaled, indices, axis=-1)
    if mode == "renormalize":
        per_position = _kl(
            jax.nn.log_softmax(teacher, axis=-1), jax.nn.log_softmax(picked, axis=-1)
        )
    else:
        teacher_tail, student_tail = _tail_log_masses(scaled, teacher, indices)
        log_p = jnp.concatenate([teacher, teacher_tail], axis=-1)
        log_q = jnp.concatenate(
            [picked - jax.nn.logsumexp(scaled, axis=-1, keepdims=True), student_tail], axis=-1
        )
        per_position = _kl(log_p, log_q)
    return _reduce(per_position, mask, reduction)
