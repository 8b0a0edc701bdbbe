"""Dynamic sparse training: RigL (regrow by gradient magnitude) and SET (regrow at random)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcomp.sparsity._masks import Masks, _check_bool, _check_tree, _is_none, apply_masks
from jaxcomp.sparsity._optax import _masked_updates, _reset_moments
from jaxcomp.sparsity._select import _keep_top, _sortable_keys

_REGROW = ("gradient", "random")


class DynamicSparseState(NamedTuple):
    """State of :func:`rigl` / :func:`set_`: step counter, current masks, inner optimizer state."""

    count: jax.Array
    masks: Masks
    inner_state: Any


def cosine_drop_fraction(step: jax.Array, drop_fraction: float, end_step: int) -> jax.Array:
    """The fraction of active weights replaced at ``step`` (Evci et al., 2020).

    .. math::

        f(t) = \\frac{\\alpha}{2} \\left(1 + \\cos \\frac{\\pi t}{T_{end}}\\right), \\quad
        f(t) = 0 \\text{ for } t \\ge T_{end}

    Args:
      step: int step ``t``.
      drop_fraction: :math:`\\alpha`, the fraction at step 0.
      end_step: :math:`T_{end}`, the step from which masks are frozen.

    Returns:
      float32 scalar.

    >>> round(float(cosine_drop_fraction(50, 0.3, 100)), 6)
    0.15

    References: Evci et al., Rigging the Lottery: Making All Tickets Winners, 2020.
    """
    t = jnp.asarray(step, jnp.float32)
    f = 0.5 * drop_fraction * (1.0 + jnp.cos(jnp.float32(math.pi) * t / jnp.float32(end_step)))
    return jnp.where(t < end_step, f, jnp.zeros((), jnp.float32)).astype(jnp.float32)


def _top(scores: jax.Array, keep: jax.Array) -> jax.Array:
    """Exactly ``keep`` entries with the largest scores (ties: lower flat index)."""
    mask = _keep_top([_sortable_keys(scores.reshape(1, -1))], keep.reshape(1))[0]
    return mask.reshape(scores.shape)


def _swap(mask, weight, grow_score, fraction):
    """Drops the ``round(fraction * k)`` smallest |w| of the ``k`` active entries; regrows as many.

    Returns ``(new_mask, kept)``: ``kept`` are the surviving active entries (the
    regrown ones are ``new_mask & ~kept``). The count ``k`` is unchanged.
    """
    active = jnp.sum(mask, dtype=jnp.int32)
    n_drop = jnp.round(fraction * active.astype(jnp.float32)).astype(jnp.int32)
    n_drop = jnp.minimum(n_drop, jnp.minimum(active, mask.size - active))
    neg_inf = jnp.full((), -jnp.inf, jnp.float32)
    drop_score = jnp.where(mask, jnp.abs(weight).astype(jnp.float32), neg_inf)
    kept = _top(drop_score, active - n_drop)
    grow = _top(jnp.where(kept, neg_inf, grow_score.astype(jnp.float32)), n_drop)
    return kept | grow, kept


def dynamic_sparse(
    inner: optax.GradientTransformation,
    masks: Masks,
    *,
    regrow: str = "gradient",
    frequency: int = 100,
    end_step: int = 1000,
    drop_fraction: float = 0.3,
    key: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Sparse training whose masks move: every ``frequency`` steps, drop the weakest, regrow others.

    Each step runs ``inner`` and lands the params on
    :math:`w' = m \\odot (w + u)`. On steps :math:`t > 0` with
    :math:`t \\bmod \\Delta T = 0` and :math:`t < T_{end}` (a ``jax.lax.cond``, no
    recompilation), each masked leaf with :math:`k` active entries drops the
    :math:`d = \\mathrm{round}(f(t)\\,k)` active entries of smallest
    :math:`|w + u|` and activates :math:`d` inactive ones (the just-dropped ones
    may come back) with the largest :math:`|g|` (``regrow="gradient"``, RigL;
    ``g`` = the incoming updates, so put this first in a chain) or at random
    (``"random"``, SET). :math:`f` is :func:`cosine_drop_fraction`. Every leaf
    keeps exactly :math:`k` active entries. Regrown weights start at exactly 0
    and the inner state's params-shaped leaves (moments) are zeroed at every
    inactive and regrown entry. ``None`` masks leave a leaf dense and untouched.

    Args:
      inner: the optimizer (e.g. ``optax.adam``).
      masks: initial mask tree (e.g. ``compute_masks(params, sparsity=0.9,
        scope="erk")``); start from ``apply_masks(params, masks)``.
      regrow: ``"gradient"`` (RigL) or ``"random"`` (SET, needs ``key``).
      frequency: :math:`\\Delta T`, steps between mask updates.
      end_step: :math:`T_{end}`, masks are frozen from this step on.
      drop_fraction: :math:`\\alpha` in :func:`cosine_drop_fraction`, in ``[0, 1]``.
      key: PRNG key for ``regrow="random"`` (folded with the step and leaf index).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DynamicSparseState`;
      ``update`` requires ``params``.

    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([3.0, 0.0, 0.1, 0.0])}
    >>> masks = {"w": jnp.array([True, False, True, False])}
    >>> tx = rigl(optax.sgd(0.0), masks, frequency=1, end_step=10, drop_fraction=0.5)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([0.0, 0.0, 0.0, 5.0])}
    >>> for _ in range(2):
    ...     updates, state = jax.jit(tx.update)(grads, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> state.masks["w"], params["w"]
    (Array([ True, False, False,  True], dtype=bool), Array([3., 0., 0., 0.], dtype=float32))

    References: Evci et al., Rigging the Lottery: Making All Tickets Winners, 2020
    (RigL); Mocanu et al., Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science, 2018 (SET).
    """
    if regrow not in _REGROW:
        raise ValueError(f"unknown regrow {regrow!r}; allowed: {', '.join(map(repr, _REGROW))}")
    if (key is None) == (regrow == "random"):
        raise ValueError(f"key= is needed with, and only with, regrow='random'; got {regrow!r}")
    for name, value, low in (("frequency", frequency, 1), ("end_step", end_step, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} is {value!r}; expected an int >= {low}")
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, int | float):
        raise TypeError(f"drop_fraction is {drop_fraction!r}; expected a float in [0, 1]")
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction is {drop_fraction!r}; expected a float in [0, 1]")
    _check_bool(masks)

    def init_fn(params):
        _check_tree(params, masks)
        return DynamicSparseState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def new_masks(candidate, grads, old_masks, step):
        fraction = cosine_drop_fraction(step, drop_fraction, end_step)
        flat, treedef = jax.tree.flatten(old_masks, is_leaf=_is_none)
        weights = jax.tree.leaves(candidate, is_leaf=_is_none)
        flat_grads = jax.tree.leaves(grads, is_leaf=_is_none)
        out, survivors = [], []
        for i, (m, w, g) in enumerate(zip(flat, weights, flat_grads, strict=True)):
            if m is None:
                out.append(None)
                survivors.append(None)
                continue
            if regrow == "gradient":
                score = jnp.abs(jnp.asarray(g).astype(jnp.float32))
            else:
                leaf_key = jax.random.fold_in(jax.random.fold_in(key, step), i)
                score = jax.random.uniform(leaf_key, jnp.shape(m))
            new, kept = _swap(m, w, score, fraction)
            out.append(new)
            survivors.append(kept)
        return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, survivors)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("rigl/set_ read the weights: call update(updates, state, params)")
        _check_tree(params, updates, what="updates")
        inner_updates, inner_state = inner.update(updates, state.inner_state, params)
        candidate = apply_masks(optax.apply_updates(params, inner_updates), state.masks)
        step = state.count
        is_update = (step > 0) & (step % frequency == 0) & (step < end_step)

        def recompute(inner_state):
            masks, kept = new_masks(candidate, updates, state.masks, step)
            return masks, kept, _reset_moments(inner, inner_state, kept)

        masks, kept, inner_state = jax.lax.cond(
            is_update,
            recompute,
            lambda inner_state: (state.masks, state.masks, inner_state),
            inner_state,
        )
        new_updates = _masked_updates(inner_updates, params, kept)
        return new_updates, DynamicSparseState(optax.safe_increment(step), masks, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def rigl(
    inner: optax.GradientTransformation,
    masks: Masks,
    *,
    frequency: int = 100,
    end_step: int = 1000,
    drop_fraction: float = 0.3,
) -> optax.GradientTransformation:
    """RigL: :func:`dynamic_sparse` that regrows the inactive entries of largest gradient.

    .. math::

        \\text{grow} = \\mathrm{top}_d\\big(|g| \\text{ over inactive entries}\\big)

    Args:
      inner: the optimizer.
      masks: initial mask tree (``None`` = dense leaf).
      frequency: steps between mask updates.
      end_step: masks are frozen from this step on.
      drop_fraction: initial fraction of active weights swapped (cosine-decayed).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`DynamicSparseState`).

    >>> import jax.numpy as jnp, optax
    >>> tx = rigl(optax.sgd(0.1), {"w": jnp.array([True, False]), "b": None})
    >>> tx.init({"w": jnp.zeros(2), "b": jnp.zeros(1)}).count
    Array(0, dtype=int32)

    References: Evci et al., Rigging the Lottery: Making All Tickets Winners, 2020.
    """
    return dynamic_sparse(
        inner,
        masks,
        regrow="gradient",
        frequency=frequency,
        end_step=end_step,
        drop_fraction=drop_fraction,
    )


def set_(
    inner: optax.GradientTransformation,
    masks: Masks,
    *,
    key: jax.Array,
    frequency: int = 100,
    end_step: int = 1000,
    drop_fraction: float = 0.3,
) -> optax.GradientTransformation:
    """SET: :func:`dynamic_sparse` that regrows inactive entries chosen uniformly at random.

    .. math::

        \\text{grow} = \\mathrm{top}_d\\big(u \\sim U[0, 1) \\text{ over inactive entries}\\big)

    Args:
      inner: the optimizer.
      masks: initial mask tree (``None`` = dense leaf).
      key: PRNG key (folded with the step and the leaf index).
      frequency: steps between mask updates.
      end_step: masks are frozen from this step on.
      drop_fraction: initial fraction of active weights swapped (cosine-decayed).

    Returns:
      An ``optax.GradientTransformation`` (state :class:`DynamicSparseState`).

    >>> import jax, jax.numpy as jnp, optax
    >>> tx = set_(optax.sgd(0.1), {"w": jnp.array([True, False])}, key=jax.random.key(0))
    >>> tx.init({"w": jnp.zeros(2)}).masks["w"]
    Array([ True, False], dtype=bool)

    References: Mocanu et al., Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science, 2018.
    """
    return dynamic_sparse(
        inner,
        masks,
        regrow="random",
        frequency=frequency,
        end_step=end_step,
        drop_fraction=drop_fraction,
        key=key,
    )
