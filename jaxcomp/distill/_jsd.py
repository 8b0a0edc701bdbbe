"""Divergences through a mixture of teacher and student: generalized JSD and skew KL.

Notation: ``p = softmax(z_t / T)`` (teacher), ``q = softmax(z_s / T)`` (student).
Mixtures are formed in log space (``logaddexp``), so a probability far below
float32's smallest normal number still gives the right log. No ``T^2`` factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.distill._divergences import _kl
from jaxcomp.distill._inputs import _check_unit, _prepare
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce


def _log_mix(weight: jax.Array, log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """``log(w a + (1 - w) b)`` elementwise; ``-inf`` (with finite gradients) where both are 0."""
    log_wa = jnp.log(weight) + log_a
    log_wb = jnp.log1p(-weight) + log_b
    empty = jnp.isneginf(log_wa) & jnp.isneginf(log_wb)
    mixed = jnp.logaddexp(jnp.where(empty, 0.0, log_wa), jnp.where(empty, 0.0, log_wb))
    return jnp.where(empty, -jnp.inf, mixed)


def _jsd_interior(log_p: jax.Array, log_q: jax.Array, beta: jax.Array) -> jax.Array:
    b = jnp.where((beta == 0) | (beta == 1), 0.5, beta)  # finite when not selected; nan stays
    log_m = _log_mix(b, log_p, log_q)
    return b * _kl(log_p, log_m) + (1.0 - b) * _kl(log_q, log_m)


# generalized_jsd's branches, indexed by beta == 0 / 0 < beta < 1 / beta == 1.
_JSD_BRANCHES = (
    lambda log_p, log_q, beta: _kl(log_p, log_q),  # beta == 0: forward KL(p || q)
    _jsd_interior,
    lambda log_p, log_q, beta: _kl(log_q, log_p),  # beta == 1: reverse KL(q || p)
)


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: ArrayLike = 0.5,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Generalized Jensen-Shannon divergence of GKD, in TRL's convention.

    .. math::

        M = \beta p + (1 - \beta) q, \qquad
        \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p \,\|\, M)
            + (1 - \beta)\, \mathrm{KL}(q \,\|\, M)

    ``beta = 0.5`` is the symmetric Jensen-Shannon divergence. The expression tends
    to 0 at both ends, so the endpoints are defined by convention, as in TRL's
    ``GKDTrainer.generalized_jsd_loss``: ``beta = 0`` is exactly the forward KL
    ``KL(p || q)`` (:func:`kl_div`) and ``beta = 1`` is exactly the reverse KL
    ``KL(q || p)`` (:func:`reverse_kl`). The loss is therefore discontinuous at the
    endpoints. (Some JAX libraries use the opposite endpoint convention.) ``beta``
    may be traced; only the selected branch runs (:func:`jax.lax.switch`).

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      beta: teacher weight in the mixture, in ``[0, 1]``; may be a traced scalar.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.array([0.0, -jnp.inf])  # disjoint supports: JSD = log 2
      >>> teacher = jnp.array([-jnp.inf, 0.0])
      >>> round(float(generalized_jsd(student, teacher, beta=0.5)), 4)
      0.6931

    References:
      Agarwal et al., On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes, 2023.
    """
    beta = _check_unit("beta", beta)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    branch = jnp.where(beta == 0, 0, jnp.where(beta == 1, 2, 1))
    per_position = jax.lax.switch(branch, _JSD_BRANCHES, log_p, log_q, beta)
    return _reduce(per_position, mask, reduction)


def skew_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: ArrayLike = 0.1,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Skew forward KL of DistiLLM: the teacher against a teacher-student mixture.

    .. math::

        \mathrm{SKL}_\alpha(p, q) = \mathrm{KL}\big(p \,\|\, \alpha p + (1 - \alpha) q\big)

    ``alpha = 0`` is the forward KL; larger ``alpha`` bounds the loss (at most
    ``-log alpha``) and smooths its gradient when ``q`` misses a mode of ``p``. This
    is the full KL; DistiLLM's reference code drops the constant ``-H(p)``, which does
    not change the gradient.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      alpha: teacher weight in the mixture, in ``[0, 1]``; may be a traced scalar.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.array([0.0, -jnp.inf])  # misses the teacher's only mode
      >>> teacher = jnp.array([-jnp.inf, 0.0])
      >>> round(float(skew_kl(student, teacher, alpha=0.1)), 4)  # -log 0.1
      2.3026

    References:
      Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, 2024.
    """
    alpha = _check_unit("alpha", alpha)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    return _reduce(_kl(log_p, _log_mix(alpha, log_p, log_q)), mask, reduction)


def skew_reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: ArrayLike = 0.1,
    temperature: ArrayLike = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Skew reverse KL of DistiLLM: the student against a student-teacher mixture.

    .. math::

        \mathrm{SRKL}_\alpha(p, q) = \mathrm{KL}\big(q \,\|\, \alpha q + (1 - \alpha) p\big)

    ``alpha`` is the *student* weight in the mixture, as in DistiLLM's
    ``skewed_reverse_kl``; ``alpha = 0`` is the reverse KL.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      alpha: student weight in the mixture, in ``[0, 1]``; may be a traced scalar.
      temperature: softmax temperature ``T > 0``; may be a traced scalar.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.array([0.0, -jnp.inf])
      >>> teacher = jnp.array([-jnp.inf, 0.0])
      >>> round(float(skew_reverse_kl(student, teacher, alpha=0.1)), 4)  # -log 0.1
      2.3026

    References:
      Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, 2024.
    """
    alpha = _check_unit("alpha", alpha)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, where, temperature)
    return _reduce(_kl(log_q, _log_mix(alpha, log_q, log_p)), mask, reduction)
