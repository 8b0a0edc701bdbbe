"""Quantizing and dequantizing whole parameter trees, leaf by leaf, chosen by rules."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jaxcomp.quant._config import DEFAULT_CONFIG, QuantConfig
from jaxcomp.quant._qarray import QArray
from jaxcomp.quant._quantize import check_input, quantize_checked
from jaxcomp.rules import PyTree, Rules, path_str, resolve_configs


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)


def quantize_tree(
    params: PyTree,
    rules: Rules | None = None,
    *,
    default: QuantConfig | None = DEFAULT_CONFIG,
    skip_nonfinite: bool = False,
) -> PyTree:
    """Replaces the chosen float leaves of a params tree by :class:`QArray` leaves.

    Each leaf's path string (``"Dense_0/kernel"``) is matched against ``rules``
    (``[(regex, QuantConfig | None)]``, first match wins, ``None`` = leave alone);
    leaves no rule names get ``default`` if they are float kernels of rank >= 2
    not named like a bias, norm or embedding (:func:`jaxcomp.rules.is_default_target`).
    Rules that match no leaf are reported with a ``UserWarning``. Leaves that are
    already QArrays are kept as they are.

    Every chosen leaf is checked eagerly for NaN/Inf (under ``jit`` the check is
    skipped, since traced values cannot be inspected).

    Args:
      params: Flax Linen params dict, ``nnx.State`` or any pytree of arrays.
      rules: ``[(regex, QuantConfig | None)]``, or ``None``.
      default: config for the default targets (8-bit per channel); ``None``
        quantizes only ruled leaves.
      skip_nonfinite: keep leaves holding NaN/Inf in float (with a warning)
        instead of raising.

    Returns:
      A tree of the same structure with QArray leaves where quantized.

    Raises:
      ValueError: a leaf holds NaN/Inf (without ``skip_nonfinite``), or a config
        does not fit a leaf (group size not dividing its rows, bad channel axis);
        the message names the leaf path.
      TypeError: a rule's config is not a QuantConfig or None, or a ruled leaf is
        not a float array.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> q = quantize_tree(params, [("Dense_0/kernel", QuantConfig(bits=4))])
      >>> type(q["Dense_0"]["kernel"]).__name__, type(q["Dense_0"]["bias"]).__name__
      ('QArray', 'ArrayImpl')
    """
    configs = resolve_configs(params, rules, default, is_leaf=_is_qarray)

    def one(path, leaf, config):
        if config is None or isinstance(leaf, QArray):
            return leaf
        name = path_str(path)
        if not isinstance(config, QuantConfig):
            raise TypeError(f"{name}: config is {config!r}; expected a QuantConfig or None")
        try:
            x, config = check_input(leaf, config)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
            if not skip_nonfinite:
                raise ValueError(
                    f"{name}: leaf of shape {x.shape} holds NaN or Inf; fix it or pass "
                    "skip_nonfinite=True to leave it in float"
                )
            warnings.warn(f"{name}: holds NaN or Inf; left in float", UserWarning, stacklevel=3)
            return leaf
        return quantize_checked(x, config)

    return jax.tree_util.tree_map_with_path(one, params, configs, is_leaf=_is_qarray)


def dequantize_tree(tree: PyTree) -> PyTree:
    """Replaces every :class:`QArray` leaf by its float tensor; other leaves are unchanged.

    Args:
      tree: a tree returned by :func:`quantize_tree` (or any tree with QArrays).

    Returns:
      The same structure with float arrays of the original shapes and dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = quantize_tree({"w": jnp.eye(2)})
      >>> dequantize_tree(tree)["w"]
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
    """
    return jax.tree.map(
        lambda x: x.dequantize() if isinstance(x, QArray) else x, tree, is_leaf=_is_qarray
    )
