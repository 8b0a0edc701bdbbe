"""Feature distillation losses: FitNets hints, cosine alignment and attention transfer.

Student features first, teacher features second; both are computed in float32
and the teacher's gradient is stopped. Features are channels-last (Flax layout):
``[..., D]`` for hidden states, ``[B, H, W, C]`` for convolutional maps. Masks and
reductions work as for the logit losses (see :func:`kl_div`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.distill._inputs import _check_logits, _check_where
from jaxcomp.distill._reduce import LossOutput, Reduction, _reduce

Projection = ArrayLike | Callable[[jax.Array], jax.Array] | None


def _prepare_features(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    where: ArrayLike | None,
    positions: int,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Float32 features (teacher gradient stopped), masked positions zeroed.

    ``positions`` leading axes of the student are the positions the mask and the
    reduction run over; the teacher must share them.
    """
    student = _check_logits("student_feat", student_feat).astype(jnp.float32)
    teacher = _check_logits("teacher_feat", teacher_feat).astype(jnp.float32)
    if student.shape[:positions] != teacher.shape[:positions]:
        raise ValueError(
            f"student_feat has shape {student.shape} and teacher_feat has shape "
            f"{teacher.shape}; their first {positions} axes must be equal"
        )
    mask = _check_where(where, student.shape[:positions])
    teacher = jax.lax.stop_gradient(teacher)
    if mask is not None:
        student = jnp.where(
            mask.reshape(mask.shape + (1,) * (student.ndim - positions)), student, 0
        )
        teacher = jnp.where(
            mask.reshape(mask.shape + (1,) * (teacher.ndim - positions)), teacher, 0
        )
    return student, teacher, mask


def _safe_norm(x: jax.Array, eps: float) -> jax.Array:
    """``max(||x||_2, eps)`` over the last axis, with a finite gradient at ``x = 0``."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def hint_mse(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    projection: Projection = None,
    *,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""FitNets hint loss: mean squared error between projected student and teacher features.

    .. math::

        L = \frac{1}{D_t} \sum_d \big(r(h_s)_d - h_t{}_d\big)^2

    per position, where ``r`` is the regressor that maps the student's width
    ``D_s`` to the teacher's ``D_t`` (FitNets trains it jointly with the student).

    Args:
      student_feat: ``[..., D_s]`` student features (hidden states or channels-last maps).
      teacher_feat: ``[..., D_t]`` teacher features; gradients are stopped.
      projection: ``None`` (requires ``D_s == D_t``), a ``[D_s, D_t]`` matrix applied
        to the last axis (pass the trainable weight so it gets gradients), or a
        callable mapping ``[..., D_s]`` to ``[..., D_t]`` (e.g. a bound Flax module).
      where: optional boolean mask over the leading ``[...]`` positions.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student, teacher = jnp.ones((2, 3)), jnp.full((2, 4), 2.0)
      >>> float(hint_mse(student, teacher, jnp.ones((3, 4))))  # (3 - 2)^2
      1.0

    References:
      Romero et al., FitNets: Hints for Thin Deep Nets, 2015.
    """
    student, teacher, mask = _prepare_features(
        student_feat, teacher_feat, where, jnp.ndim(student_feat) - 1
    )
    if callable(projection):
        student = jnp.asarray(projection(student)).astype(jnp.float32)
    elif projection is not None:
        weight = jnp.asarray(projection)
        if weight.ndim != 2 or weight.shape[0] != student.shape[-1]:
            raise ValueError(
                f"projection has shape {weight.shape}; expected a [D_s, D_t] matrix with "
                f"D_s = {student.shape[-1]} (the student's last axis)"
            )
        student = student @ weight.astype(jnp.float32)
    if student.shape != teacher.shape:
        raise ValueError(
            f"projected student_feat has shape {student.shape} but teacher_feat has shape "
            f"{teacher.shape}; pass a projection that maps D_s to D_t"
        )
    return _reduce(jnp.mean((student - teacher) ** 2, axis=-1), mask, reduction)


def cosine_embedding_loss(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    eps: float = 1e-8,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""One minus the cosine similarity between student and teacher feature vectors.

    .. math::

        L = 1 - \frac{h_s \cdot h_t}{\max(\|h_s\|, \epsilon)\, \max(\|h_t\|, \epsilon)}

    per position, over the last axis; in ``[0, 2]``. DistilBERT aligns its hidden
    states with the teacher's this way. A zero vector gives 1 and a finite gradient.

    Args:
      student_feat: ``[..., D]`` student features.
      teacher_feat: ``[..., D]`` teacher features; gradients are stopped.
      eps: lower bound on each norm.
      where: optional boolean mask over the leading ``[...]`` positions (e.g. padding).
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[...]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> float(cosine_embedding_loss(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 3.0]])))
      1.0

    References:
      Sanh et al., DistilBERT, a distilled version of BERT: smaller, faster, cheaper
      and lighter, 2019.
    """
    student, teacher, mask = _prepare_features(
        student_feat, teacher_feat, where, jnp.ndim(student_feat) - 1
    )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_feat has shape {student.shape} and teacher_feat has shape "
            f"{teacher.shape}; they must be equal (project the student first)"
        )
    cosine = jnp.sum(student * teacher, axis=-1) / (
        _safe_norm(student, eps) * _safe_norm(teacher, eps)
    )
    return _reduce(1.0 - cosine, mask, reduction)


def _attention_map(features: jax.Array, eps: float) -> jax.Array:
    """``[B, S]`` spatial attention: channel mean of squares, flattened, L2-normalised."""
    energy = jnp.mean(features * features, axis=-1).reshape(features.shape[0], -1)
    return energy / _safe_norm(energy, eps)[:, None]


def attention_transfer(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    eps: float = 1e-12,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> LossOutput:
    r"""Attention transfer: squared distance between normalised spatial attention maps.

    .. math::

        Q = \mathrm{vec}\Big(\frac{1}{C} \sum_c A_{:, :, c}^2\Big), \qquad
        L = \frac{1}{S} \Big\| \frac{Q_s}{\|Q_s\|_2} - \frac{Q_t}{\|Q_t\|_2} \Big\|_2^2

    per example, over the ``S`` spatial positions, as in the authors' code
    (``(at(x) - at(y)).pow(2).mean()``). The paper's weight (``beta / 2`` with
    ``beta = 1000``, summed over layer pairs) is left to the caller. Student and
    teacher may differ in channels but not in spatial size.

    Args:
      student_feat: ``[B, *spatial, C_s]`` channels-last student activations.
      teacher_feat: ``[B, *spatial, C_t]`` teacher activations; gradients are stopped.
      eps: lower bound on the attention-map norm.
      where: optional boolean mask of shape ``[B]``.
      reduction: ``"mean"``, ``"sum_count"`` or ``"none"``, as in :func:`kl_div`.

    Returns:
      A float32 scalar, a ``(float32 sum, int32 count)`` pair, or a ``[B]`` array.

    Example:
      >>> import jax.numpy as jnp
      >>> student = jnp.ones((1, 2, 2, 3))
      >>> teacher = 5.0 * jnp.ones((1, 2, 2, 8))  # same map after normalisation
      >>> float(attention_transfer(student, teacher))
      0.0

    References:
      Zagoruyko and Komodakis, Paying More Attention to Attention: Improving the
      Performance of Convolutional Neural Networks via Attention Transfer, 2017.
    """
    student, teacher, mask = _prepare_features(student_feat, teacher_feat, where, 1)
    if student.ndim < 3 or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_feat has shape {student.shape} and teacher_feat has shape "
            f"{teacher.shape}; expected [B, *spatial, C] maps with equal B and spatial sizes"
        )
    diff = _attention_map(student, eps) - _attention_map(teacher, eps)
    return _reduce(jnp.mean(diff * diff, axis=-1), mask, reduction)
