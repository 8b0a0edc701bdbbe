"""Leaf paths, rule matching and byte accounting shared by every transform.

A *rule list* is a sequence of ``(regex, config)`` pairs. Each leaf's path string
(``"Dense_0/kernel"``, ``"layers/3/attn/q/kernel"``) is matched with
:func:`re.search` against the patterns in order; the first match wins and a
``None`` config means "leave this leaf alone". Leaves that no rule matches get
the transform's default, which by convention applies only to kernels of rank
>= 2 whose path does not look like a bias, norm or embedding.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Rules = Sequence[tuple[str, Any]]

_SKIP_BY_DEFAULT = re.compile(r"(^|/)[^/]*(bias|norm|Norm|embed|Embed|scale)[^/]*(/|$)")
_NNX_VALUE_KEYS = ("value", "raw_value")


def path_str(path: tuple) -> str:
    """Turns a ``jax.tree_util`` key path into ``"a/b/0/kernel"``.

    NNX ``Variable`` wrappers add a trailing ``.value`` key; it is dropped so that
    Linen params and ``nnx.State`` give the same strings.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
    ['a/0', 'a/1']
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name in _NNX_VALUE_KEYS:
                continue
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def is_default_target(path: str, leaf: Any) -> bool:
    """True for leaves a transform touches when no rule names them.

    Kernels of rank >= 2 with a floating dtype, except biases, norms and
    embeddings (recognised by their path).
    """
    shape = getattr(leaf, "shape", ())
    dtype = getattr(leaf, "dtype", None)
    if len(shape) < 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return False
    return _SKIP_BY_DEFAULT.search(path) is None


def validate_rules(rules: Rules | None) -> list[tuple[re.Pattern, Any]]:
    """Compiles a rule list, raising a clear error for malformed entries."""
    if rules is None:
        return []
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"rule {i} is {rule!r}; expected a (regex string, config) pair")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rule {i} has an invalid regex {rule[0]!r}: {e}") from None
    return compiled


def resolve_configs(
    tree: PyTree,
    rules: Rules | None,
    default: Any,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    warn_unused: bool = True,
) -> PyTree:
    """Returns a tree of per-leaf configs (``None`` = untouched).

    Args:
      tree: params pytree (Linen dict, ``nnx.State`` or nested containers).
      rules: ``[(regex, config_or_None)]``; first match on the leaf path wins.
      default: config for leaves no rule matches and that pass
        :func:`is_default_target`; ``None`` to touch only ruled leaves.
      is_leaf: extra leaf predicate (e.g. to stop at ``QArray`` nodes).
      warn_unused: emit a ``UserWarning`` listing rules that matched no leaf.

    Returns:
      A tree with the same structure as ``tree`` holding configs or ``None``.
    """
    compiled = validate_rules(rules)
    used = [False] * len(compiled)

    def pick(path, leaf):
        name = path_str(path)
        for i, (pattern, config) in enumerate(compiled):
            if pattern.search(name):
                used[i] = True
                return config
        return default if is_default_target(name, leaf) else None

    configs = jax.tree_util.tree_map_with_path(pick, tree, is_leaf=is_leaf)
    unused = [compiled[i][0].pattern for i, u in enumerate(used) if not u]
    if unused and warn_unused:
        warnings.warn(f"rules matched no leaf: {unused}", UserWarning, stacklevel=2)
    return configs


def unused_rules(tree: PyTree, rules: Rules | None, *, is_leaf=None) -> list[str]:
    """Patterns of ``rules`` that match no leaf path of ``tree``."""
    compiled = validate_rules(rules)
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
    return [p.pattern for p, _ in compiled if not any(p.search(n) for n in names)]


def leaf_nbytes(leaf: Any) -> int:
    """Bytes really held by one leaf (packed codes and scales for quantized leaves)."""
    if leaf is None:
        return 0
    nbytes = getattr(leaf, "nbytes", None)
    if nbytes is None:
        return int(np.asarray(leaf).nbytes)
    return int(nbytes)


def tree_nbytes(tree: PyTree, *, is_leaf: Callable[[Any], bool] | None = None) -> int:
    """Sum of :func:`leaf_nbytes` over a tree; compressed containers count as leaves.

    Any node with an ``nbytes`` attribute (``QArray``, compact sparse formats) is
    measured as a whole, so its packed size is what is reported.
    """

    def stop(x):
        return x is None or hasattr(x, "nbytes") or (is_leaf is not None and is_leaf(x))

    return sum(leaf_nbytes(x) for x in jax.tree.leaves(tree, is_leaf=stop))
