"""optax transforms that keep pruned weights at zero and prune on a schedule."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcomp.rules import Rules
from jaxcomp.sparsity._compute import (
    _SCOPES,
    _SCORES,
    _check_choice,
    _check_config,
    _leaf_targets,
    _score_tree,
    _select,
)
from jaxcomp.sparsity._masks import Masks, _check_bool, _check_tree, _is_none, apply_masks
from jaxcomp.sparsity._patterns import _parse_pattern
from jaxcomp.sparsity._schedules import SparsitySchedule


class KeepMasksState(NamedTuple):
    """State of :func:`keep_masks`: the masks, carried as arrays rather than constants."""

    masks: Masks


def _masked_updates(updates, params, masks):
    """Updates that land exactly on ``masks * (params + updates)``: ``-params`` where pruned."""

    def one(m, u, p):
        return u if m is None else jnp.where(m, u, -jnp.asarray(p).astype(u.dtype))

    return jax.tree.map(one, masks, updates, params, is_leaf=_is_none)


def keep_masks(masks: Masks) -> optax.GradientTransformation:
    """Zeroes the updates of pruned entries so that pruned weights stay exactly 0.

    Put it LAST in an ``optax.chain``, after every transform that adds to the
    update (momentum, weight decay, ...), and start from masked params
    (:func:`apply_masks`):

    .. math::

        u'_i = m_i \\, u_i

    The masks live in the state (not in the jitted function as constants), so
    they are sharded/replicated like the rest of the optimizer state.

    Args:
      masks: mask tree (bool, ``True`` = kept; ``None`` = dense leaf).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`KeepMasksState`.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([1.0, 0.0])}
    >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9),
    ...                  keep_masks({"w": jnp.array([True, False])}))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.9, 0. ], dtype=float32)
    """
    _check_bool(masks)

    def init_fn(params):
        _check_tree(params, masks)
        return KeepMasksState(masks=masks)

    def update_fn(updates, state, params=None):
        del params
        _check_tree(updates, state.masks, ref="updates")
        masked = jax.tree.map(
            lambda m, u: u if m is None else jnp.where(m, u, jnp.zeros((), u.dtype)),
            state.masks,
            updates,
            is_leaf=_is_none,
        )
        return masked, state

    return optax.GradientTransformation(init_fn, update_fn)


class PruneState(NamedTuple):
    """State of :func:`prune`: step counter, current masks and the inner optimizer state."""

    count: jax.Array
    masks: Masks
    inner_state: Any


def _reset_moments(inner: optax.GradientTransformation, inner_state, masks: Masks):
    """Zeroes the params-shaped leaves of ``inner_state`` at pruned entries.

    Params-shaped subtrees (Adam's ``mu``/``nu``, momentum traces, ...) are found
    with :func:`optax.tree_utils.tree_map_params`; within them a leaf is reset
    only if its shape equals the mask's, so factored statistics are left alone.
    """

    def reset(leaf, mask):
        if mask is None or jnp.shape(leaf) != jnp.shape(mask):
            return leaf
        return jnp.where(mask, leaf, jnp.zeros((), jnp.result_type(leaf)))

    return optax.tree_utils.tree_map_params(inner, reset, inner_state, masks, is_leaf=_is_none)


def prune(
    inner: optax.GradientTransformation,
    *,
    schedule: SparsitySchedule,
    pattern: str = "unstructured",
    score: str = "magnitude",
    scope: str = "layer",
    rules: Rules | None = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Wraps an optimizer so that it prunes its params on a sparsity schedule.

    Each step runs ``inner``, giving the candidate :math:`\\tilde w = w + u`. On
    schedule update steps (a ``jax.lax.cond``, no recompilation) the masks are
    recomputed with :func:`compute_masks` semantics from the candidate masked by
    the previous masks, with previously pruned entries scored lowest (so they
    stay pruned while the sparsity grows), at sparsity ``schedule.sparsity(step)``.
    The returned update lands the params exactly on

    .. math::

        w' = m \\odot (w + u), \\qquad \\text{update} = m \\odot u - (1 - m) \\odot w,

    so pruned entries are exactly 0 after every step. On update steps the inner
    state's params-shaped leaves (moments, momentum) are zeroed at pruned entries
    (found with ``optax.tree_utils.tree_map_params``; leaves whose shape differs
    from the param, such as factored statistics, are left alone).

    A rule value ``v`` (per-leaf final sparsity) follows the schedule's shape:
    the leaf gets :math:`v \\, s_t / s_f` at step :math:`t`. With an N:M pattern
    the schedule's target must be ``1 - N/M``; masks are all-True until the
    schedule's sparsity is positive, then N:M. Sparsity counts are evaluated in
    float32 from the traced schedule value (exact for leaves below :math:`2^{24}`
    entries up to float32 rounding of :math:`s_t`).

    Args:
      inner: the optimizer whose updates are pruned.
      schedule: e.g. :func:`polynomial_schedule`, :func:`one_shot_schedule`.
      pattern: as in :func:`compute_masks`.
      score: ``"magnitude"``, ``"random"`` (needs ``key``; folded with the step)
        or ``"saliency"`` (:math:`|w \\cdot g|`, with the incoming updates taken as
        the gradient ``g``: put ``prune`` first).
      scope: as in :func:`compute_masks`.
      rules: as in :func:`compute_masks`.
      key: PRNG key for ``score="random"``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`PruneState`;
      ``update`` requires ``params``.

    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxcomp.sparsity import one_shot_schedule
    >>> tx = prune(optax.sgd(0.1), schedule=one_shot_schedule(0.5, step=0))
    >>> params = {"kernel": jnp.array([[1.0, -3.0], [0.5, 2.0]])}
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    >>> optax.apply_updates(params, updates)["kernel"]
    Array([[ 0., -3.],
           [ 0.,  2.]], dtype=float32)

    References: Zhu & Gupta, To prune, or not to prune: exploring the efficacy of
    pruning for model compression, 2017.
    """
    parsed = _parse_pattern(pattern)
    _check_choice("score", score, _SCORES)
    _check_choice("scope", scope, _SCOPES)
    _check_config(parsed, scope)
    if (key is None) == (score == "random"):
        raise ValueError(f"key= is needed with, and only with, score='random'; got {score!r}")
    target = schedule.target_sparsity
    implied = parsed.implied_sparsity

    def init_fn(params):
        targets = _leaf_targets(params, target, parsed, scope, rules)
        masks = jax.tree.map(
            lambda t, p: None if t is None else jnp.ones(jnp.shape(p), jnp.bool_),
            targets,
            params,
            is_leaf=_is_none,
        )
        return PruneState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def new_masks(candidate, grads, old_masks, step):
        sparsity = schedule.sparsity(step)
        scale = sparsity / target if target > 0 else jnp.zeros((), jnp.float32)
        targets = jax.tree.map(
            lambda t: None if t is None else t * scale,
            _leaf_targets(candidate, target, parsed, scope, rules),
            is_leaf=_is_none,
        )
        scores = _score_tree(
            candidate,
            targets,
            score,
            None if key is None else jax.random.fold_in(key, step),
            None,
            grads if score == "saliency" else None,
        )
        scores = jax.tree.map(
            lambda s, m: None if s is None else jnp.where(m, s.astype(jnp.float32), -jnp.inf),
            scores,
            old_masks,
            is_leaf=_is_none,
        )
        masks = _select(candidate, scores, targets, parsed, scope)
        if implied is not None:
            masks = jax.tree.map(
                lambda m: None if m is None else m | (sparsity <= 0), masks, is_leaf=_is_none
            )
        return masks

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "prune recomputes masks from params: call update(updates, state, params)"
            )
        inner_updates, inner_state = inner.update(updates, state.inner_state, params)
        candidate = apply_masks(optax.apply_updates(params, inner_updates), state.masks)

        def recompute(inner_state):
            masks = new_masks(candidate, updates, state.masks, state.count)
            return masks, _reset_moments(inner, inner_state, masks)

        masks, inner_state = jax.lax.cond(
            schedule.is_update_step(state.count),
            recompute,
            lambda inner_state: (state.masks, inner_state),
            inner_state,
        )
        new_updates = _masked_updates(inner_updates, params, masks)
        return new_updates, PruneState(optax.safe_increment(state.count), masks, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
