"""Decoupled knowledge distillation (DKD): target-class and non-target-class KL terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.distill._divergences import _kl
from jaxcomp.distill._inputs import (
    _check_labels,
    _check_temperature,
    _check_weight,
    _prepare_logits,
)
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce


def _decouple(logits: jax.Array, is_target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Binary ``[log p_y, log(1 - p_y)]`` and the non-target log-distribution.

    The non-target distribution has ``-inf`` at the target class (excluded exactly,
    not by subtracting a large constant as the reference code does).
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    others = jnp.where(is_target, -jnp.inf, logits)
    log_other_mass = jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
    log_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
    binary = jnp.stack([log_target, log_other_mass], axis=-1)
    return binary, jax.nn.log_softmax(others, axis=-1)


def dkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 1.0,
    beta: ArrayLike = 8.0,
    temperature: ArrayLike = 4.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Decoupled knowledge distillation: weighted target-class and non-target-class KL.

    With ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)`` and target class ``y``:

    .. math::

        \mathrm{TCKD} = \mathrm{KL}\big([p_y, 1 - p_y] \,\|\, [q_y, 1 - q_y]\big), \qquad
        \mathrm{NCKD} = \mathrm{KL}(\hat p \,\|\, \hat q), \quad
        \hat p_v = \frac{p_v}{1 - p_y}\ (v \ne y)

    .. math::

        L = T^2 (\alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD})

    Classic KD is ``TCKD + (1 - p_y) NCKD``; DKD frees the NCKD weight from
    ``1 - p_y``. As in the reference code the ``T^2`` factor is included and the
    cross-entropy on the labels (and DKD's warm-up ramp) is left to the caller.
    Paper defaults on CIFAR-100: ``alpha = 1``, ``beta = 8``, ``T = 4``.

    Args:
      student_logits: ``[..., V]`` student logits, ``V >= 2``, any float dtype (float32 math).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      labels: integer target classes of shape ``[...]``; ignored at masked positions;
        traced out-of-range labels give ``nan``.
      alpha: weight of the target-class term, ``>= 0``; may be traced.
      beta: weight of the non-target-class term, ``>= 0``; may be traced.
      temperature: softmax temperature ``T > 0``; may be traced.
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[2.0, 0.5, -1.0]])
      >>> float(dkd_loss(logits, logits, jnp.array([0])))
      0.0

    References:
      Zhao et al., Decoupled Knowledge Distillation, 2022.
    """
    student, teacher, mask = _prepare_logits(student_logits, teacher_logits, where)
    num_classes = student.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes; got logits with V = {num_classes}")
    labels = _check_labels(labels, student.shape[:-1], num_classes, mask)
    alpha = _check_weight("alpha", alpha)
    beta = _check_weight("beta", beta)
    temperature = _check_temperature(temperature)

    is_target = labels[..., None] == jnp.arange(num_classes)
    binary_p, other_p = _decouple(teacher / temperature, is_target)
    binary_q, other_q = _decouple(student / temperature, is_target)
    per_position = temperature**2 * (alpha * _kl(binary_p, binary_q) + beta * _kl(other_p, other_q))
    in_range = (labels >= 0) & (labels < num_classes)  # traced labels are not checked above
    per_position = jnp.where(in_range, per_position, jnp.nan)
    return _reduce(per_position, mask, reduction)
