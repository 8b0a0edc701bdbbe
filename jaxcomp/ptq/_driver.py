"""Model-level post-training compression: per-layer algorithms applied through rules."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp import quant
from jaxcomp import sparsity as _sparsity
from jaxcomp.ptq._capture import LayerStats, capture_stats, mean_hessian
from jaxcomp.ptq._fold import leaves_by_path, replace_leaves
from jaxcomp.ptq._gptq import gptq
from jaxcomp.ptq._sparsegpt import sparsegpt
from jaxcomp.ptq._wanda import wanda
from jaxcomp.rules import Rules, path_str, resolve_configs

MODES = ("parallel", "sequential")


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings for one layer (see :func:`jaxcomp.ptq.gptq`)."""

    bits: int = 4
    group_size: int | None = None
    act_order: bool = False
    symmetric: bool = True
    damp: float = 0.01


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT settings for one layer (see :func:`jaxcomp.ptq.sparsegpt`)."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    bits: int | None = None
    group_size: int | None = None
    damp: float = 0.01


@dataclasses.dataclass(frozen=True)
class WandaConfig:
    """Wanda settings for one layer (see :func:`jaxcomp.ptq.wanda`)."""

    sparsity: float | None = None
    pattern: str = "unstructured"


CONFIGS = (GPTQConfig, SparseGPTConfig, WandaConfig)


def _fallback(name: str, kernel, config):
    """Round-to-nearest / magnitude pruning for a layer that got no calibration tokens."""
    what = "round-to-nearest" if isinstance(config, GPTQConfig) else "magnitude pruning"
    warnings.warn(
        f"{name}: no calibration tokens reached this layer; falling back to {what}",
        UserWarning,
        stacklevel=3,
    )
    if isinstance(config, GPTQConfig):
        q = quant.quantize(
            kernel, config.bits, group_size=config.group_size, symmetric=config.symmetric
        )
        return q, q.dequantize(), None
    keep = _sparsity.compute_masks({"w": kernel}, sparsity=config.sparsity, pattern=config.pattern)[
        "w"
    ]
    w = jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))
    if isinstance(config, SparseGPTConfig) and config.bits is not None:
        w = quant.quantize(w, config.bits, group_size=config.group_size).dequantize()
        w = jnp.where(keep, w, jnp.zeros((), w.dtype))
    return w, w, keep


def _compress_layer(name: str, kernel, stats: LayerStats | None, config):
    """Returns ``(stored leaf, float kernel for later layers, mask or None)``."""
    if stats is None or int(stats.count) == 0:
        return _fallback(name, kernel, config)
    if isinstance(config, GPTQConfig):
        q = gptq(
            kernel,
            mean_hessian(stats),
            bits=config.bits,
            group_size=config.group_size,
            act_order=config.act_order,
            symmetric=config.symmetric,
            damp=config.damp,
            name=name,
        )
        return q, q.dequantize(), None
    if isinstance(config, SparseGPTConfig):
        w, keep = sparsegpt(
            kernel,
            mean_hessian(stats),
            sparsity=config.sparsity,
            pattern=config.pattern,
            bits=config.bits,
            group_size=config.group_size,
            damp=config.damp,
            name=name,
        )
        return w, w, keep
    w, keep = wanda(
        kernel, jnp.sqrt(stats.sq_sum), sparsity=config.sparsity, pattern=config.pattern, name=name
    )
    return w, w, keep


def ruled_kernels(params, rules: Rules | None, default, allowed: tuple[type, ...]) -> dict:
    """``{kernel path: config}`` for every leaf of rank >= 2 that a rule (or ``default``) names.

    Rules may also match biases and norms; those leaves are skipped. A config of a
    type not in ``allowed`` is a ``TypeError`` naming the leaf.
    """
    configs = resolve_configs(params, rules, default)
    flat = jax.tree_util.tree_flatten_with_path(configs, is_leaf=lambda x: x is None)[0]
    leaves = leaves_by_path(params)
    targets = {}
    for path, config in flat:
        name = path_str(path)
        if config is None or jnp.ndim(leaves[name]) < 2:
            continue
        if not isinstance(config, allowed):
            raise TypeError(
                f"{name}: config is {config!r}; expected one of "
                f"{[c.__name__ for c in allowed]} or None"
            )
        targets[name] = config
    return targets


def compress_model(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    rules: Rules | None = None,
    default: GPTQConfig | SparseGPTConfig | WandaConfig | None = GPTQConfig(),
    mode: str = "parallel",
) -> tuple[Any, Any]:
    """Compresses every ruled Dense/Linear kernel of a Linen or NNX model from calibration data.

    Each kernel (leaf of rank >= 2; rules that also match biases are ignored
    there) gets the config of the first rule whose regex matches its path
    (``None`` = left alone; unmatched kernels get ``default``); the config's
    type picks the algorithm: :class:`GPTQConfig` (the leaf becomes a
    :class:`jaxcomp.quant.QArray`), :class:`SparseGPTConfig` or
    :class:`WandaConfig` (a pruned float kernel and a mask).

    ``mode="parallel"``: one calibration pass over the float model; every layer
    is compressed from its own float inputs. ``mode="sequential"``: layers are
    compressed one by one in call order, and each layer's statistics are
    re-collected from a model whose earlier layers are already compressed (the
    error propagation of GPTQ's and llm-compressor's sequential pipelines);
    that costs one calibration pass per layer and needs re-iterable ``batches``.
    A layer that receives no calibration token (all masked, or never called)
    is compressed without data (round-to-nearest or magnitude) with a warning.

    Args:
      model: a ``flax.linen.Module`` or an ``nnx.GraphDef`` (see :func:`capture_stats`).
      params: Linen params dict or ``nnx.State``.
      batches: calibration inputs ``x`` or ``(x, where)`` pairs (``where`` masks padding).
      rules: ``[(regex, config or None)]`` on leaf paths such as ``"Dense_0/kernel"``.
      default: config for kernels no rule names, or ``None``.
      mode: ``"parallel"`` or ``"sequential"``.

    Returns:
      ``(params, masks)``: the compressed tree (same structure; QArrays at GPTQ
      leaves) and a mask tree (bool at pruned leaves, ``None`` elsewhere).

    Raises:
      ValueError: bad mode or config, NaN/Inf in a layer's inputs (named).
      TypeError: ``mode="sequential"`` with a one-shot iterator of batches.

    References:
      Frantar et al., GPTQ: Accurate Post-Training Quantization for Generative
      Pre-trained Transformers, 2022.

    Example:
      >>> import flax.linen as nn
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
      >>> x = jax.random.normal(jax.random.key(1), (64, 8))
      >>> qparams, _ = compress_model(model, params, [x], default=GPTQConfig(bits=4))
      >>> type(qparams["kernel"]).__name__
      'QArray'
    """
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES}")
    kernels = leaves_by_path(params)
    targets = ruled_kernels(params, rules, default, CONFIGS)
    if mode == "sequential" and iter(batches) is batches:
        raise TypeError("mode='sequential' re-reads the calibration batches: pass a list")
    stats, order = capture_stats(model, params, batches, targets=targets)
    order += sorted(n for n in targets if n not in order)
    stored, current, masks = {}, dict(kernels), {}
    for i, name in enumerate(order):
        if mode == "sequential" and i > 0:
            layer_stats, _ = capture_stats(
                model, replace_leaves(params, current), batches, targets=[name]
            )
            stats[name] = layer_stats.get(name)
        leaf, as_float, keep = _compress_layer(name, kernels[name], stats.get(name), targets[name])
        stored[name], current[name] = leaf, as_float
        if keep is not None:
            masks[name] = keep
    mask_tree = jax.tree_util.tree_map_with_path(lambda p, x: masks.get(path_str(p)), params)
    return replace_leaves(params, stored), mask_tree
