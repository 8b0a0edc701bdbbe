"""Argument checks and float32 preparation shared by the distillation losses.

Every logit loss takes student logits first and teacher logits second, both
``[..., V]``. They are cast to float32 (bf16 teacher logits are fine), the
teacher is wrapped in :func:`jax.lax.stop_gradient`, and positions excluded by
``where`` are replaced by zeros so that padding holding garbage (``nan``,
``-inf`` rows) can neither reach the loss nor its gradient.

Scalar hyperparameters (temperature, alpha, beta) may be Python numbers, NumPy
scalars or traced JAX scalars (e.g. driven by an optax schedule inside ``jit``);
their range is checked whenever the value is known at trace time, and a traced
value out of range turns the loss into ``nan`` rather than a plausible number.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def _check_scalar(
    name: str, value: ArrayLike, ok: Callable[[float], bool], allowed: str
) -> jax.Array:
    """Returns ``value`` as a float32 scalar, raising if a concrete value is out of range."""
    if isinstance(value, jax.core.Tracer):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar; got a traced value of shape {value.shape}")
    else:
        concrete = np.asarray(value)
        if not (
            jnp.issubdtype(concrete.dtype, jnp.floating)
            or jnp.issubdtype(concrete.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{name} must be a real number; got {value!r} of dtype {concrete.dtype}"
            )
        if concrete.ndim != 0:
            raise ValueError(f"{name} must be a scalar; got shape {concrete.shape}")
        if not ok(float(concrete)):
            raise ValueError(f"{name} must be {allowed}; got {float(concrete)!r}")
    return jnp.asarray(value).astype(jnp.float32)


def _check_temperature(temperature: ArrayLike) -> jax.Array:
    """Float32 temperature; a concrete value must be finite and > 0, a traced one <= 0 is nan."""
    t = _check_scalar(
        "temperature", temperature, lambda t: bool(np.isfinite(t)) and t > 0, "finite and > 0"
    )
    return jnp.where(t > 0, t, jnp.nan)


def _check_unit(name: str, value: ArrayLike) -> jax.Array:
    """Float32 weight; a concrete value must lie in [0, 1], a traced one outside it is nan."""
    x = _check_scalar(name, value, lambda x: 0.0 <= x <= 1.0, "in [0, 1]")
    return jnp.where((x >= 0) & (x <= 1), x, jnp.nan)


def _check_weight(name: str, value: ArrayLike) -> jax.Array:
    """Float32 loss weight; a concrete value must be finite and >= 0, a traced one < 0 is nan."""
    x = _check_scalar(name, value, lambda x: bool(np.isfinite(x)) and x >= 0, "finite and >= 0")
    return jnp.where(x >= 0, x, jnp.nan)


def _check_logits(name: str, logits: ArrayLike) -> jax.Array:
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError(f"{name} must have at least one axis ([..., V]); got a scalar")
    return logits


def _check_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    """Boolean mask of the leading shape, or None for "every position counts"."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if not (where.dtype == jnp.bool_ or jnp.issubdtype(where.dtype, jnp.integer)):
        raise TypeError(f"where must be a boolean (or 0/1 integer) mask; got dtype {where.dtype}")
    if where.shape != shape:
        raise ValueError(
            f"where has shape {where.shape}; it must equal the logits' leading shape {shape}"
        )
    return where if where.dtype == jnp.bool_ else where != 0


def _prepare_logits(
    student_logits: ArrayLike, teacher_logits: ArrayLike, where: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Checked float32 ``(student, stop_gradient(teacher), mask)``; masked rows are zeroed."""
    student = _check_logits("student_logits", student_logits)
    teacher = _check_logits("teacher_logits", teacher_logits)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: student_logits has {student.shape[-1]} classes and "
            f"teacher_logits has {teacher.shape[-1]}; they must be equal (logits are never "
            "broadcast over the vocabulary)"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits has shape {student.shape} and teacher_logits has shape "
            f"{teacher.shape}; the leading (position) shapes must be equal"
        )
    mask = _check_where(where, student.shape[:-1])
    student = student.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    if mask is not None:
        student = jnp.where(mask[..., None], student, 0.0)
        teacher = jnp.where(mask[..., None], teacher, 0.0)
    return student, teacher, mask


def _prepare(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    where: ArrayLike | None,
    temperature: ArrayLike,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(log q, log p, mask)`` with ``q = softmax(z_s / T)`` and ``p = softmax(z_t / T)``."""
    student, teacher, mask = _prepare_logits(student_logits, teacher_logits, where)
    temperature = _check_temperature(temperature)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return log_q, log_p, mask


def _check_labels(
    labels: ArrayLike, shape: tuple[int, ...], num_classes: int, mask: jax.Array | None
) -> jax.Array:
    """Integer labels of the leading shape, with masked positions set to class 0.

    Labels at masked positions may hold anything (``-100`` padding, say). When the
    labels and the mask are concrete, unmasked labels must lie in ``[0, num_classes)``;
    traced out-of-range labels give a ``nan`` loss.
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must have an integer dtype; got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(
            f"labels has shape {labels.shape}; it must equal the logits' leading shape {shape}"
        )
    if not isinstance(labels, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
        values = np.asarray(labels)
        counted = np.ones(shape, bool) if mask is None else np.asarray(mask)
        bad = values[counted & ((values < 0) | (values >= num_classes))]
        if bad.size:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) at unmasked positions; got {bad[0]}"
            )
    return labels if mask is None else jnp.where(mask, labels, 0)
