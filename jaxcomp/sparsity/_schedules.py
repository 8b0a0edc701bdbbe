"""Sparsity schedules: how much to prune at a step, and on which steps to re-prune.

A schedule is a frozen, hashable dataclass (so it can be static configuration
under ``jit``) with two methods that accept Python or traced integer steps:
``sparsity(step)`` (float32) and ``is_update_step(step)`` (bool). Calling the
schedule is the same as ``sparsity(step)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.sparsity._compute import _check_sparsity


class SparsitySchedule(Protocol):
    """What :func:`jaxcomp.sparsity.prune` needs from a schedule."""

    target_sparsity: float

    def sparsity(self, step: ArrayLike) -> jax.Array: ...

    def is_update_step(self, step: ArrayLike) -> jax.Array: ...


def _check_step(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} is {value!r}; expected an int >= {minimum}")
    return value


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
    """Gradual pruning schedule; build it with :func:`polynomial_schedule`."""

    target_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 1
    initial_sparsity: float = 0.0
    power: float = 3.0

    def __post_init__(self):
        _check_sparsity(self.target_sparsity, "target_sparsity")
        _check_sparsity(self.initial_sparsity, "initial_sparsity")
        _check_step(self.begin_step, "begin_step", 0)
        _check_step(self.end_step, "end_step", self.begin_step + 1)
        _check_step(self.frequency, "frequency", 1)
        if (self.end_step - self.begin_step) % self.frequency:
            raise ValueError(
                f"end_step - begin_step = {self.end_step - self.begin_step} is not a multiple "
                f"of frequency {self.frequency}; the final sparsity would never be applied"
            )
        if isinstance(self.power, bool) or not isinstance(self.power, int | float):
            raise ValueError(f"power is {self.power!r}; expected a positive number")
        if self.power <= 0:
            raise ValueError(f"power is {self.power!r}; expected a positive number")

    def sparsity(self, step: ArrayLike) -> jax.Array:
        """Sparsity at ``step``: constant between update steps, before begin and after end."""
        t0, t1 = self.begin_step, self.end_step
        step = jnp.clip(jnp.asarray(step, jnp.int32), t0, t1)
        last_update = t0 + (step - t0) // self.frequency * self.frequency
        progress = (last_update - t0).astype(jnp.float32) / jnp.float32(t1 - t0)
        base = 1.0 - progress
        # pow(0, p) is NaN on some XLA backends under jit; the end point is exactly 0.
        remaining = jnp.where(base > 0, jnp.power(jnp.maximum(base, 1e-30), self.power), 0.0)
        s_i, s_f = jnp.float32(self.initial_sparsity), jnp.float32(self.target_sparsity)
        return s_i * remaining + s_f * (1.0 - remaining)

    def is_update_step(self, step: ArrayLike) -> jax.Array:
        """True on ``begin_step + k * frequency`` up to and including ``end_step``."""
        step = jnp.asarray(step, jnp.int32)
        in_range = (step >= self.begin_step) & (step <= self.end_step)
        return in_range & ((step - self.begin_step) % self.frequency == 0)

    def __call__(self, step: ArrayLike) -> jax.Array:
        return self.sparsity(step)


def polynomial_schedule(
    target_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    initial_sparsity: float = 0.0,
    power: float = 3,
) -> PolynomialSchedule:
    """Gradual magnitude pruning schedule of Zhu & Gupta.

    With :math:`t' = t_0 + \\lfloor (\\min(\\max(t, t_0), t_1) - t_0) / f \\rfloor f`
    (the last update step at or before :math:`t`),

    .. math::

        s_t = s_f + (s_i - s_f) \\Big(1 - \\frac{t' - t_0}{t_1 - t_0}\\Big)^{p}

    so :math:`s_t = s_i` before ``begin_step``, :math:`s_f` from ``end_step`` on,
    and it only changes on update steps :math:`t_0 + k f \\le t_1`.

    Args:
      target_sparsity: :math:`s_f` in ``[0, 1)``.
      begin_step: :math:`t_0 \\ge 0`, the first update step.
      end_step: :math:`t_1 > t_0`, the last update step; ``end_step - begin_step``
        must be a multiple of ``frequency`` so that :math:`s_f` is reached.
      frequency: :math:`f \\ge 1`, steps between updates.
      initial_sparsity: :math:`s_i` in ``[0, 1)``.
      power: :math:`p > 0` (3 in the paper).

    Returns:
      A frozen, hashable :class:`PolynomialSchedule`.

    >>> sched = polynomial_schedule(0.8, begin_step=0, end_step=100, frequency=10)
    >>> float(sched.sparsity(0)), round(float(sched.sparsity(55)), 4), float(sched(200))
    (0.0, 0.7, 0.800000011920929)
    >>> bool(sched.is_update_step(50)), bool(sched.is_update_step(55))
    (True, False)

    References: Zhu & Gupta, To prune, or not to prune: exploring the efficacy of
    pruning for model compression, 2017.
    """
    return PolynomialSchedule(
        target_sparsity, begin_step, end_step, frequency, initial_sparsity, power
    )


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
    """Prunes once; build it with :func:`one_shot_schedule`."""

    target_sparsity: float
    step: int

    def __post_init__(self):
        _check_sparsity(self.target_sparsity, "target_sparsity")
        _check_step(self.step, "step", 0)

    def sparsity(self, step: ArrayLike) -> jax.Array:
        """0 before ``self.step``, ``target_sparsity`` from it on."""
        reached = jnp.asarray(step, jnp.int32) >= self.step
        return jnp.where(reached, jnp.float32(self.target_sparsity), jnp.float32(0))

    def is_update_step(self, step: ArrayLike) -> jax.Array:
        """True only on ``self.step``."""
        return jnp.asarray(step, jnp.int32) == self.step

    def __call__(self, step: ArrayLike) -> jax.Array:
        return self.sparsity(step)


def one_shot_schedule(target_sparsity: float, step: int) -> OneShotSchedule:
    """Prunes to ``target_sparsity`` at a single step.

    .. math::

        s_t = s_f \\, [t \\ge t_0]

    Args:
      target_sparsity: :math:`s_f` in ``[0, 1)``.
      step: :math:`t_0 \\ge 0`, the only update step.

    Returns:
      A frozen, hashable :class:`OneShotSchedule`.

    >>> sched = one_shot_schedule(0.5, step=10)
    >>> float(sched(9)), float(sched(10)), bool(sched.is_update_step(10))
    (0.0, 0.5, True)
    """
    return OneShotSchedule(target_sparsity, step)


@dataclasses.dataclass(frozen=True)
class IterativeSchedule:
    """Prunes the same fraction of the remaining weights at each listed step."""

    target_sparsity: float
    steps: tuple[int, ...]

    def __post_init__(self):
        _check_sparsity(self.target_sparsity, "target_sparsity")
        if not self.steps:
            raise ValueError("steps is empty; expected at least one update step")
        for s in self.steps:
            _check_step(s, "each of steps", 0)
        if any(a >= b for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps {self.steps!r} must be strictly increasing")

    def sparsity(self, step: ArrayLike) -> jax.Array:
        """:math:`1 - (1 - s_f)^{k/K}` after the k-th of K update steps."""
        done = jnp.sum(jnp.asarray(step, jnp.int32) >= jnp.asarray(self.steps, jnp.int32))
        fraction = done.astype(jnp.float32) / jnp.float32(len(self.steps))
        return 1.0 - jnp.power(jnp.float32(1.0 - self.target_sparsity), fraction)

    def is_update_step(self, step: ArrayLike) -> jax.Array:
        """True on the listed steps."""
        return jnp.any(jnp.asarray(step, jnp.int32) == jnp.asarray(self.steps, jnp.int32))

    def __call__(self, step: ArrayLike) -> jax.Array:
        return self.sparsity(step)


def iterative_schedule(target_sparsity: float, steps: Sequence[int]) -> IterativeSchedule:
    """Iterative pruning: each of K rounds removes the same share of what is left.

    After the k-th update step (of K),

    .. math::

        s = 1 - (1 - s_f)^{k / K}

    which is iterative magnitude pruning's "prune p% of the remaining weights per
    round" with :math:`p = 1 - (1 - s_f)^{1/K}`.

    Args:
      target_sparsity: :math:`s_f` in ``[0, 1)``, reached at the last step.
      steps: strictly increasing update steps (K of them).

    Returns:
      A frozen, hashable :class:`IterativeSchedule`.

    >>> sched = iterative_schedule(0.75, steps=[100, 200])
    >>> float(sched(99)), float(sched(150)), float(sched(200))
    (0.0, 0.5, 0.75)

    References: Frankle & Carbin, The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks, 2019.
    """
    return IterativeSchedule(target_sparsity, tuple(steps))
