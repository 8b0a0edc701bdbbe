"""Hinton et al.'s knowledge-distillation loss: softened teacher targets plus hard labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.distill._divergences import _kl
from jaxcomp.distill._inputs import _check_labels, _check_temperature, _check_unit, _prepare_logits
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce


def hinton_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 4.0,
    alpha: ArrayLike = 0.9,
    t_squared: bool = True,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Classic distillation loss: ``T^2``-scaled soft KL plus cross-entropy on the labels.

    .. math::

        L = \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_t / T) \,\|\,
            \mathrm{softmax}(z_s / T)\big)
            + (1 - \alpha)\, \mathrm{CE}\big(y, \mathrm{softmax}(z_s)\big)

    The soft term's gradient w.r.t. ``z_s`` is ``T (q - p)``: the ``T^2`` factor keeps
    its size independent of ``T`` (for large ``T`` and zero-mean logits it tends to
    ``(z_s - z_t) / V``, logit matching). ``t_squared=False`` drops the factor, as
    some libraries do. The cross-entropy uses the student at temperature 1.

    Args:
      student_logits: ``[..., V]`` student logits, any float dtype (computed in float32).
      teacher_logits: ``[..., V]`` teacher logits (bf16 is fine); gradients are stopped.
      labels: integer class labels of shape ``[...]``; values at masked positions are
        ignored (``-100`` padding is fine there).
      temperature: softmax temperature ``T > 0`` of the soft term; may be traced.
      alpha: weight of the soft term, in ``[0, 1]``; may be traced.
      t_squared: multiply the soft term by ``T^2`` (a static Python bool).
      where: optional boolean mask of shape ``[...]``; ``False`` positions are excluded.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.zeros((2, 4))
      >>> labels = jnp.array([0, 3])
      >>> round(float(hinton_loss(logits, logits, labels, alpha=0.5)), 4)  # 0.5 log 4
      0.6931

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015.
    """
    if not isinstance(t_squared, bool):
        raise TypeError(f"t_squared must be a Python bool (it is static); got {t_squared!r}")
    student, teacher, mask = _prepare_logits(student_logits, teacher_logits, where)
    labels = _check_labels(labels, student.shape[:-1], student.shape[-1], mask)
    temperature = _check_temperature(temperature)
    alpha = _check_unit("alpha", alpha)

    soft = _kl(
        jax.nn.log_softmax(teacher / temperature, axis=-1),
        jax.nn.log_softmax(student / temperature, axis=-1),
    )
    if t_squared:
        soft = soft * temperature**2
    log_probs = jax.nn.log_softmax(student, axis=-1)
    hard = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return _reduce(alpha * soft + (1.0 - alpha) * hard, mask, reduction)
