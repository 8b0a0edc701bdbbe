"""Capturing intermediate activations from Flax Linen and NNX models for feature losses.

Linen: values a module records with ``self.sow("intermediates", name, value)`` (or,
with ``capture_intermediates=True``, every submodule's output) are returned by
``apply(..., mutable=["intermediates"])``. NNX: values recorded with
``self.sow(nnx.Intermediate, name, value)`` are popped from the module after the
call. Both are flattened to ``{"block_0/attn/attn_probs": array, ...}`` so that
feature losses pick layers by path, without editing the model beyond ``sow``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxcomp.rules import path_str

PyTree = Any


def _flatten(tree: PyTree) -> dict[str, jax.Array]:
    """``{path: array}``: a sown tuple ``(v,)`` gives ``path -> v`` (several: ``path/i``).

    Outputs recorded by ``capture_intermediates`` (``.../__call__``) are listed under
    the module's path; the model's own output under ``"output"``.
    """
    leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    out: dict[str, jax.Array] = {}
    for name, leaf in leaves.items():
        parts = name.split("/")
        if parts[-1] == "0" and "/".join([*parts[:-1], "1"]) not in leaves:
            parts = parts[:-1]
        if parts and parts[-1] == "__call__":
            parts = parts[:-1]
        out["/".join(parts) or "output"] = leaf
    return out


def capture_linen(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *args: Any,
    capture_all: bool | Callable[..., bool] = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, jax.Array]]:
    """Runs a Linen ``apply`` and returns its output and the flattened intermediates.

    Args:
      apply_fn: ``model.apply``.
      variables: ``{"params": ...}`` (and other collections).
      *args: the model's inputs.
      capture_all: also record submodule outputs without ``sow`` (Flax's
        ``capture_intermediates``: ``True`` or a filter ``(module, method_name) -> bool``).
      **kwargs: passed to the model (e.g. ``train=False``).

    Returns:
      ``(output, {path: array})``; sown values appear under their path (e.g.
      ``"block_0/attn/attn_probs"``), captured outputs under the module path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcomp.models import GPT, GPTConfig
      >>> model = GPT(GPTConfig(vocab_size=7, max_len=4, n_layer=1, n_head=1, d_model=4, d_ff=8))
      >>> x = jnp.zeros((1, 3), jnp.int32)
      >>> logits, feats = capture_linen(model.apply, model.init(jax.random.key(0), x), x)
      >>> feats["block_0/hidden"].shape
      (1, 3, 4)
    """
    output, state = apply_fn(
        variables, *args, mutable=["intermediates"], capture_intermediates=capture_all, **kwargs
    )
    return output, _flatten(state.get("intermediates", {}))


def capture_nnx(model: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, jax.Array]]:
    """Calls an NNX module under ``nnx.capture`` and returns what it ``sow``-ed.

    Values recorded with ``self.sow(nnx.Intermediate, name, value)`` are collected
    for this call only (nothing is left on the module, so calls do not accumulate).

    Returns:
      ``(output, {path: array})``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.a = nnx.Linear(2, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         h = self.a(x)
      ...         self.sow(nnx.Intermediate, "h", h)
      ...         return h.sum(-1)
      >>> out, feats = capture_nnx(Net(nnx.Rngs(0)), jnp.ones((4, 2)))
      >>> feats["h"].shape
      (4, 3)
    """
    from flax import nnx

    output, state = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    return output, _flatten(nnx.to_pure_dict(state))


def select_layers(features: Mapping[str, jax.Array], pattern: str) -> list[jax.Array]:
    """The features whose path matches ``pattern`` (a regex), ordered by layer number.

    Paths are sorted by the integers they contain (``block_2`` before ``block_10``).

    Raises:
      ValueError: if nothing matches, naming the available paths.

    Example:
      >>> feats = {"block_10/hidden": 10, "block_2/hidden": 2, "embed": 0}
      >>> select_layers(feats, r"block_\\d+/hidden$")
      [2, 10]
    """
    regex = re.compile(pattern)
    names = [n for n in features if regex.search(n)]
    if not names:
        raise ValueError(f"no captured feature matches {pattern!r}; available: {sorted(features)}")

    def key(name):
        return [int(x) for x in re.findall(r"\d+", name)], name

    return [features[n] for n in sorted(names, key=key)]
