"""Pruning masks from scores: :func:`compute_masks` and the selection it shares with ``prune``."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp.rules import PyTree, Rules, path_str, resolve_configs
from jaxcomp.sparsity._allocation import erk_sparsities
from jaxcomp.sparsity._masks import Masks, Params, _check_tree, _is_none
from jaxcomp.sparsity._patterns import (
    Pattern,
    _check_leaf,
    _expand,
    _parse_pattern,
    _unit_grid,
    _units,
)
from jaxcomp.sparsity._select import _keep_top, _keep_top_in_groups, _sortable_keys

_SCORES = ("magnitude", "random", "saliency")
_SCOPES = ("layer", "global", "output", "erk")
_MAX_UNITS = 2**31 - 1


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _check_sparsity(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} is {value!r}; expected a float in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} is {value!r}; sparsity must be in [0, 1)")
    return float(value)


def _check_config(pattern: Pattern, scope: str) -> None:
    if pattern.kind == "n:m" and scope != "layer":
        raise ValueError(
            f"scope {scope!r} does not apply to N:M patterns, which keep N of every M "
            "entries in each group; use scope='layer'"
        )
    if scope == "output" and pattern.kind != "unstructured":
        raise ValueError(f"scope 'output' needs pattern 'unstructured', got {pattern.kind!r}")
    if scope == "global" and pattern.kind == "channel":
        raise ValueError(
            "scope 'global' needs units of one size; use pattern 'unstructured' or 'block:RxC' "
            "or scope 'layer' / 'erk' with pattern 'channel'"
        )


def _leaf_targets(params: Params, sparsity: float | None, pattern: Pattern, scope: str, rules):
    """Static per-leaf sparsity (``None`` = dense) after rules, with every check."""
    implied = pattern.implied_sparsity
    if sparsity is None:
        sparsity = 0.5 if implied is None else implied
    sparsity = _check_sparsity(sparsity, "sparsity")
    if implied is not None and abs(sparsity - implied) > 1e-9:
        raise ValueError(
            f"sparsity {sparsity!r} contradicts N:M pattern implying 1 - N/M = {implied!r}; "
            "leave sparsity=None for N:M patterns"
        )
    configs = resolve_configs(params, rules, default=sparsity)
    fixed = implied is not None or scope in ("global", "erk")

    def check(path, config):
        if config is None:
            return None
        name = path_str(path)
        value = _check_sparsity(config, f"the rule sparsity of leaf {name!r}")
        if fixed and abs(value - sparsity) > 1e-9:
            raise ValueError(
                f"the rule sparsity of leaf {name!r} is {value!r} but pattern "
                f"{pattern.kind!r} with scope {scope!r} fixes it to {sparsity!r}; per-leaf "
                "sparsities need scope='layer' (rules may still say None to skip a leaf)"
            )
        return value

    return jax.tree_util.tree_map_with_path(check, configs, is_leaf=_is_none)


def _score_tree(params, targets, score, key, scores, grads) -> PyTree:
    """Scores at the pruned leaves (``None`` elsewhere); larger scores are kept."""
    for name, given, user in (("key", key, "random"), ("grads", grads, "saliency")):
        if scores is None and score == user and given is None:
            raise ValueError(f"score={user!r} needs {name}=")
        if given is not None and score != user:
            raise ValueError(f"{name}= is only used with score={user!r}, got score={score!r}")
    if scores is not None:
        if score != "magnitude":
            raise ValueError(f"pass either scores= or score=, got scores= and score={score!r}")
        _check_tree(params, scores, "scores")
    elif grads is not None:
        _check_tree(params, grads, "grads")

    def leaf_score(index, path, target, param, given, grad):
        if target is None:
            return None
        if scores is not None:
            if given is None:
                raise ValueError(f"scores has None at leaf {path_str(path)!r}, which is pruned")
            return jnp.asarray(given)
        if score == "magnitude":
            return jnp.abs(param)
        if score == "random":
            return jax.random.uniform(jax.random.fold_in(key, index), jnp.shape(param))
        return jnp.abs(param.astype(jnp.float32) * jnp.asarray(grad).astype(jnp.float32))

    flat_targets, treedef = jax.tree_util.tree_flatten_with_path(targets, is_leaf=_is_none)
    flat_params = jax.tree.leaves(params, is_leaf=_is_none)
    none = [None] * len(flat_params)
    flat_scores = none if scores is None else jax.tree.leaves(scores, is_leaf=_is_none)
    flat_grads = none if grads is None else jax.tree.leaves(grads, is_leaf=_is_none)
    out = [
        leaf_score(i, path, t, p, s, g)
        for i, ((path, t), p, s, g) in enumerate(
            zip(flat_targets, flat_params, flat_scores, flat_grads, strict=True)
        )
    ]
    return jax.tree.unflatten(treedef, out)


def _n_keep(units: int, sparsity: Any, rows: int = 1) -> jax.Array:
    """``units - round(sparsity * units)`` per row: exact for a Python float, else float32."""
    if isinstance(sparsity, float):
        keep = jnp.asarray(units - round(sparsity * units), jnp.int32)
    else:
        pruned = jnp.round(jnp.asarray(sparsity, jnp.float32) * jnp.float32(units))
        keep = jnp.int32(units) - pruned.astype(jnp.int32)
    return jnp.broadcast_to(keep, (rows,))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pattern_masks(scores: list, keep: jax.Array, pattern: Pattern, scope: str) -> list:
    """Masks of leaves whose units compete together (one leaf, or all for "global")."""
    keys = [_sortable_keys(_units(s, pattern, scope)) for s in scores]
    unit_masks = _keep_top(keys, keep)
    return [_expand(u, s.shape, pattern, scope) for u, s in zip(unit_masks, scores, strict=True)]


def _select(params: Params, scores: PyTree, targets: PyTree, pattern: Pattern, scope: str):
    """Masks from scores and per-leaf sparsities (Python floats or JAX scalars)."""
    flat_targets, treedef = jax.tree_util.tree_flatten_with_path(targets, is_leaf=_is_none)
    flat_scores = jax.tree.leaves(scores, is_leaf=_is_none)
    flat_params = jax.tree.leaves(params, is_leaf=_is_none)
    chosen = [i for i, (_, t) in enumerate(flat_targets) if t is not None]
    shapes = {i: tuple(jnp.shape(flat_params[i])) for i in chosen}
    for i in chosen:
        _check_leaf(path_str(flat_targets[i][0]), shapes[i], pattern, scope)
    grids = {i: _unit_grid(shapes[i], pattern, scope) for i in chosen}
    total = sum(rows * units for rows, units in grids.values())
    if total > _MAX_UNITS:
        raise ValueError(f"{total} selection units exceed the int32 counting limit {_MAX_UNITS}")
    sparsity = {i: flat_targets[i][1] for i in chosen}
    if scope == "erk" and chosen:
        allocated = erk_sparsities([shapes[i] for i in chosen], sparsity[chosen[0]])
        sparsity = dict(zip(chosen, allocated, strict=True))
    masks: list[Any] = [None] * len(flat_targets)
    if pattern.kind == "n:m":
        for i in chosen:
            matrix = jnp.reshape(flat_scores[i], (-1, shapes[i][-1]))
            masks[i] = _keep_top_in_groups(matrix, pattern.n, pattern.m).reshape(shapes[i])
    elif scope == "global" and chosen:
        keep = _n_keep(total, sparsity[chosen[0]])
        leaf_masks = _pattern_masks([flat_scores[i] for i in chosen], keep, pattern, scope)
        for i, mask in zip(chosen, leaf_masks, strict=True):
            masks[i] = mask
    else:
        for i in chosen:
            rows, units = grids[i]
            keep = _n_keep(units, sparsity[i], rows)
            masks[i] = _pattern_masks([flat_scores[i]], keep, pattern, scope)[0]
    return jax.tree.unflatten(treedef, masks)


def compute_masks(
    params: Params,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    score: str = "magnitude",
    scope: str = "layer",
    rules: Rules | None = None,
    key: jax.Array | None = None,
    scores: PyTree | None = None,
    grads: PyTree | None = None,
) -> Masks:
    """Pruning masks that keep the highest-scoring entries of the chosen leaves.

    A leaf of size :math:`n` pruned to sparsity :math:`s` loses exactly

    .. math::

        \\mathrm{round}(s \\, n)

    entries (Python's ``round``, half to even): per leaf for ``scope="layer"``,
    in total over all pruned leaves for ``scope="global"`` (one threshold),
    per output column (``n`` = contraction size) for ``scope="output"``. With
    ``pattern="block:RxC"`` or ``"channel"`` the count is in blocks / columns.
    Ties are broken deterministically: among equal scores the entry with the
    lower flat index (for ``"global"``: the earlier leaf in tree order) is kept.
    NaN scores rank lowest.

    Args:
      params: params pytree (Linen dict or ``nnx.State``).
      sparsity: fraction to prune, in ``[0, 1)``; ``None`` means 0.5, or for
        ``"N:M"`` patterns the implied ``1 - N/M`` (an explicit value must equal it,
        else ``ValueError``).
      pattern: ``"unstructured"``; ``"N:M"`` (e.g. ``"2:4"``, keep N of every M
        consecutive entries along the contraction axes, which must have a size
        divisible by M); ``"block:RxC"`` (blocks of R contraction rows by C output
        columns); ``"channel"`` (whole output columns). Kernels are read as the
        matrix ``[K, C]``: ``C`` the last (output) axis, ``K`` all others flattened.
      score: ``"magnitude"`` (:math:`|w|`), ``"random"`` (uniform, needs ``key``)
        or ``"saliency"`` (:math:`|w \\cdot g|`, needs ``grads``).
      scope: ``"layer"``, ``"global"``, ``"output"`` (each output column pruned
        to ``sparsity`` on its own, as Wanda compares weights) or ``"erk"`` (per-layer
        sparsities from :func:`erk_sparsities` for the global target).
      rules: ``[(regex, sparsity_or_None)]`` on leaf paths (first match wins;
        ``None`` keeps a leaf dense). Unmatched leaves get ``sparsity`` when they
        are kernels of rank >= 2 not named bias/norm/embed/scale. Per-leaf values
        other than ``sparsity`` need ``scope="layer"`` and a non-N:M pattern.
      key: PRNG key for ``score="random"``.
      scores: precomputed score tree (arrays at pruned leaves, ``None`` allowed
        elsewhere) used instead of ``score`` (e.g. Wanda, SNIP); larger is kept.
      grads: gradient tree for ``score="saliency"``.

    Returns:
      A mask tree: bool arrays (``True`` = kept) at pruned leaves, ``None`` elsewhere.

    Raises:
      ValueError: bad sparsity, pattern, score, scope, a leaf shape the pattern
        cannot tile (named), or trees that do not match params.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0]]),
    ...                       "bias": jnp.ones(2)}}
    >>> masks = compute_masks(params, sparsity=0.5)
    >>> masks["Dense_0"]["kernel"], masks["Dense_0"]["bias"]
    (Array([[False,  True],
           [ True, False]], dtype=bool), None)

    References: Zhu & Gupta, To prune, or not to prune, 2017; Mishra et al.,
    Accelerating Sparse Deep Neural Networks, 2021 (N:M); Evci et al., Rigging the
    Lottery, 2020 (ERK); Lee et al., SNIP, 2019 (saliency).
    """
    parsed = _parse_pattern(pattern)
    _check_choice("score", score, _SCORES)
    _check_choice("scope", scope, _SCOPES)
    _check_config(parsed, scope)
    targets = _leaf_targets(params, sparsity, parsed, scope, rules)
    leaf_scores = _score_tree(params, targets, score, key, scores, grads)
    return _select(params, leaf_scores, targets, parsed, scope)
