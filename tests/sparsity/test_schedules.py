"""Sparsity schedules against float64 numpy formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcomp.sparsity as sp


def _ref_polynomial(t, s_f, t0, t1, f, s_i, p):
    t = min(max(t, t0), t1)
    last = t0 + (t - t0) // f * f
    return s_f + (s_i - s_f) * (1 - (last - t0) / (t1 - t0)) ** p


@pytest.mark.parametrize(
    ("s_f", "t0", "t1", "f", "s_i", "p"),
    [(0.9, 10, 70, 5, 0.0, 3), (0.5, 0, 8, 1, 0.2, 1), (0.75, 3, 33, 10, 0.1, 2.5)],
)
def test_polynomial_matches_zhu_gupta(s_f, t0, t1, f, s_i, p):
    sched = sp.polynomial_schedule(s_f, t0, t1, frequency=f, initial_sparsity=s_i, power=p)
    steps = np.arange(0, t1 + 15)
    got = jax.jit(jax.vmap(sched.sparsity))(jnp.asarray(steps, jnp.int32))
    expected = [_ref_polynomial(int(t), s_f, t0, t1, f, s_i, p) for t in steps]
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=2e-7)
    updates = np.asarray(jax.vmap(sched.is_update_step)(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_array_equal(updates, (steps >= t0) & (steps <= t1) & ((steps - t0) % f == 0))
    changes = np.flatnonzero(np.diff(np.asarray(got)) != 0) + 1
    assert set(changes) <= set(np.flatnonzero(updates))
    assert float(sched(t1)) == np.float32(s_f) and float(sched(10**6)) == np.float32(s_f)


def test_schedules_are_frozen_hashable_and_traceable():
    sched = sp.polynomial_schedule(0.8, 0, 100, frequency=10)
    assert hash(sched) == hash(sp.polynomial_schedule(0.8, 0, 100, frequency=10))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.end_step = 5
    fn = jax.jit(lambda t: (sched.sparsity(t), sched.is_update_step(t)))
    fn(jnp.int32(3))
    fn(jnp.int32(40))
    assert fn._cache_size() == 1
    static = jax.jit(lambda s, t: s.sparsity(t), static_argnums=0)
    assert float(static(sched, 100)) == np.float32(0.8)


def test_one_shot_and_iterative():
    one = sp.one_shot_schedule(0.6, step=7)
    steps = jnp.arange(12, dtype=jnp.int32)
    np.testing.assert_array_equal(
        jax.vmap(one.sparsity)(steps), np.where(np.arange(12) >= 7, np.float32(0.6), 0)
    )
    np.testing.assert_array_equal(jax.vmap(one.is_update_step)(steps), np.arange(12) == 7)
    it = sp.iterative_schedule(0.9, steps=[2, 5, 9])
    got = np.asarray(jax.vmap(it.sparsity)(steps), np.float64)
    rounds = np.array([np.sum(t >= np.array([2, 5, 9])) for t in range(12)])
    np.testing.assert_allclose(got, 1 - 0.1 ** (rounds / 3), rtol=0, atol=3e-7)
    np.testing.assert_array_equal(
        jax.vmap(it.is_update_step)(steps), np.isin(np.arange(12), [2, 5, 9])
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: sp.polynomial_schedule(1.0, 0, 10), "target_sparsity is 1.0"),
        (lambda: sp.polynomial_schedule(0.5, 10, 10), "end_step is 10; expected an int >= 11"),
        (lambda: sp.polynomial_schedule(0.5, -1, 10), "begin_step is -1"),
        (lambda: sp.polynomial_schedule(0.5, 0, 10, frequency=0), "frequency is 0"),
        (lambda: sp.polynomial_schedule(0.5, 0, 10, frequency=3), "not a multiple of frequency 3"),
        (lambda: sp.polynomial_schedule(0.5, 0, 10, initial_sparsity=-0.5), "initial_sparsity"),
        (lambda: sp.polynomial_schedule(0.5, 0, 10, power=0), "power is 0"),
        (lambda: sp.one_shot_schedule(0.5, step=1.5), "step is 1.5"),
        (lambda: sp.iterative_schedule(0.5, steps=[3, 3]), "strictly increasing"),
        (lambda: sp.iterative_schedule(0.5, steps=[]), "steps is empty"),
    ],
)
def test_bad_schedule_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
