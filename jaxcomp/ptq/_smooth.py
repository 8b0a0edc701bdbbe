"""Model-level scale migration: SmoothQuant (for W8A8) and AWQ (for low-bit weights).

Both capture the inputs of the kernels named by a list of :class:`Fold` in one
calibration pass over the float model, choose per-input-channel scales for each
fold, and fold them into the feeding op (:func:`fold_scales`), which leaves the
float model's function unchanged. Folds are applied in list order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp import quant
from jaxcomp.ptq._awq import awq_scales, quantize_clipped
from jaxcomp.ptq._capture import LayerStats, capture_stats, mean_hessian
from jaxcomp.ptq._driver import ruled_kernels
from jaxcomp.ptq._fold import Fold, check_fold, fold_scales, leaves_by_path, replace_leaves
from jaxcomp.rules import Rules

MIN_SCALE = 1e-5  # SmoothQuant's clamp of channel maxima


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ settings for one kernel (see :func:`jaxcomp.ptq.awq`)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    grid: int = 20
    clip: bool = True

    def __post_init__(self):
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"AWQConfig.grid is {self.grid!r}; expected a positive int")
        self.quant_config()  # validates bits, group_size and symmetric

    def quant_config(self) -> quant.QuantConfig:
        return quant.QuantConfig(
            bits=self.bits, group_size=self.group_size, symmetric=self.symmetric
        )


def smoothquant_scales(act_absmax: jax.Array, weight_absmax: jax.Array, alpha: float) -> jax.Array:
    """SmoothQuant's migration scales.

    .. math:: s_j = \\max|X_j|^{\\alpha} / \\max|W_{j,:}|^{1-\\alpha}

    with both maxima clamped below at ``1e-5``.

    Args:
      act_absmax: ``[K]`` max ``|x_j|`` over calibration tokens.
      weight_absmax: ``[K]`` max ``|W_jn|`` over the output columns of every kernel
        that reads the input.
      alpha: migration strength in ``[0, 1]``.

    Returns:
      ``s [K]``; the input becomes ``x / s`` and the kernel rows ``s_j W_j``.

    References:
      Xiao et al., SmoothQuant: Accurate and Efficient Post-Training Quantization
      for Large Language Models, 2022.

    Example:
      >>> smoothquant_scales(jnp.array([16.0, 1.0]), jnp.array([1.0, 4.0]), 0.5)
      Array([4. , 0.5], dtype=float32)
    """
    a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), MIN_SCALE)
    w = jnp.maximum(jnp.asarray(weight_absmax, jnp.float32), MIN_SCALE)
    return a**alpha / w ** (1.0 - alpha)


def _fold_stats(fold: Fold, stats: dict[str, LayerStats], method: str) -> LayerStats | None:
    """The shared input statistics of a fold's layers, or ``None`` (with a warning) if unseen."""
    seen = [stats[p] for p in fold.layers if p in stats and int(stats[p].count) > 0]
    if not seen:
        warnings.warn(
            f"{fold.prev}: no calibration tokens reached {list(fold.layers)}; "
            f"{method} leaves this fold unscaled",
            UserWarning,
            stacklevel=3,
        )
        return None
    return seen[0]


def _check_folds(folds: Sequence[Fold], leaves: dict[str, Any]) -> None:
    owner: dict[str, str] = {}
    for fold in folds:
        if not isinstance(fold, Fold):
            raise TypeError(f"folds holds {fold!r}; expected jaxcomp.ptq.Fold entries")
        check_fold(fold, leaves)
        for path in fold.layers:
            if path in owner:
                raise ValueError(
                    f"{path} is in the folds of both {owner[path]!r} and {fold.prev!r}"
                )
            owner[path] = fold.prev


def smoothquant_model(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    folds: Sequence[Fold],
    alpha: float = 0.5,
) -> Any:
    """SmoothQuant: migrates activation outliers into the weights, ready for W8A8.

    For each fold, :func:`smoothquant_scales` of the layers' input maxima and of
    the row maxima of their kernels (concatenated along outputs) are folded into
    the feeding op. Quantize the result's kernels (``quantize_tree``, int8 per
    channel) and run them with ``quantized_apply(..., mode="w8a8")``.

    Args:
      model: a Linen module, an ``nnx.GraphDef`` or ``apply_fn(params, x)`` (see
        :func:`capture_stats`).
      params: float params.
      batches: calibration inputs ``x`` or ``(x, where)`` pairs.
      folds: the model's :class:`Fold` list (e.g. :func:`jaxcomp.models.gpt_folds`).
      alpha: migration strength in ``[0, 1]``.

    Returns:
      Float params with the same structure computing the same function.

    Raises:
      ValueError: ``alpha`` outside ``[0, 1]``, folds that don't match the params.

    References:
      Xiao et al., SmoothQuant: Accurate and Efficient Post-Training Quantization
      for Large Language Models, 2022.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2, name="fc")(nn.LayerNorm(name="ln")(x))
      >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * jnp.array([1.0, 1.0, 1.0, 50.0])
      >>> params = Net().init(jax.random.key(1), x)["params"]
      >>> smooth = smoothquant_model(Net(), params, [x], folds=[Fold("ln", ("fc/kernel",))])
      >>> bool(jnp.allclose(Net().apply({"params": smooth}, x), Net().apply({"params": params}, x),
      ...                   atol=1e-5))
      True
    """
    if isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha is {alpha!r}; expected a number in [0, 1]")
    leaves = leaves_by_path(params)
    _check_folds(folds, leaves)
    targets = [p for fold in folds for p in fold.layers]
    stats, _ = capture_stats(model, params, batches, targets=targets)
    for fold in folds:
        fold_stats = _fold_stats(fold, stats, "SmoothQuant")
        if fold_stats is None:
            continue
        leaves = leaves_by_path(params)
        w = jnp.concatenate([jnp.abs(leaves[p]).astype(jnp.float32) for p in fold.layers], axis=1)
        scales = smoothquant_scales(fold_stats.abs_max, w.max(axis=1), float(alpha))
        params = fold_scales(params, fold, scales)
    return params


def _awq_targets(params, rules, default) -> dict[str, AWQConfig]:
    leaves = leaves_by_path(params)
    targets = ruled_kernels(params, rules, default, (AWQConfig,))
    for name, config in targets.items():
        shape = jnp.shape(leaves[name])
        if len(shape) != 2:
            raise ValueError(f"{name}: AWQ needs a Dense kernel [in, out]; got shape {shape}")
        if config.group_size is not None and shape[0] % config.group_size:
            raise ValueError(
                f"{name}: group_size {config.group_size} does not divide the {shape[0]} input rows"
            )
    return targets


def awq_model(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    folds: Sequence[Fold],
    rules: Rules | None = None,
    default: AWQConfig | None = AWQConfig(),
) -> Any:
    """AWQ of every ruled 2-D Dense kernel, with the scales folded into the feeding ops.

    One calibration pass over the float model collects each kernel's input
    Hessian and mean ``|x|``. For each fold, in order, the scale search runs on
    the fold's ruled kernels together (concatenated along outputs; they must
    share one config) and the scales are folded in; the fold's other kernels are
    rescaled in float. Then every ruled kernel is quantized with the clipping
    search on its (rescaled) Hessian. Kernels in no fold get the clipping search
    only; kernels no calibration token reached fall back to round-to-nearest with
    a warning naming them.

    Args:
      model: a Linen module, an ``nnx.GraphDef`` or ``apply_fn(params, x)``.
      params: float params (Linen dict or ``nnx.State``).
      batches: calibration inputs ``x`` or ``(x, where)`` pairs.
      folds: the model's :class:`Fold` list (``[]``: clipping search only).
      rules: ``[(regex, AWQConfig or None)]`` on leaf paths.
      default: config for kernels no rule names, or ``None``.

    Returns:
      The params with a :class:`jaxcomp.quant.QArray` at every ruled kernel and
      the feeding ops rescaled; run with :func:`jaxcomp.quant.quantized_apply`
      (``mode="weight_only"``) or :func:`jaxcomp.quant.dequantize_tree`.

    Raises:
      ValueError: folds that don't match the params, a ruled kernel that is not
        2-D (give it a ``(regex, None)`` rule), a group size that does not divide a
        kernel's rows, kernels of one fold with different configs.
      TypeError: a config that is not an :class:`AWQConfig`.

    References:
      Lin et al., AWQ: Activation-aware Weight Quantization for LLM Compression
      and Acceleration, 2023.

    Example:
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2, name="fc")(nn.LayerNorm(name="ln")(x))
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = Net().init(jax.random.key(1), x)["params"]
      >>> q = awq_model(Net(), params, [x], folds=[Fold("ln", ("fc/kernel",))],
      ...               default=AWQConfig(bits=4, group_size=None))
      >>> type(q["fc"]["kernel"]).__name__, q["ln"]["scale"].shape
      ('QArray', (8,))
    """
    leaves = leaves_by_path(params)
    _check_folds(folds, leaves)
    targets = _awq_targets(params, rules, default)
    stats, _ = capture_stats(
        model, params, batches, targets=set(targets) | {p for f in folds for p in f.layers}
    )
    input_scale: dict[str, jax.Array] = {}
    for fold in folds:
        ruled = [p for p in fold.layers if p in targets]
        configs = {targets[p] for p in ruled}
        if len(configs) > 1:
            raise ValueError(
                f"the kernels folded into {fold.prev!r} have different configs: {ruled}"
            )
        fold_stats = _fold_stats(fold, stats, "AWQ") if ruled else None
        if fold_stats is None:
            continue
        config = configs.pop()
        leaves = leaves_by_path(params)
        w = jnp.concatenate([leaves[p] for p in ruled], axis=1)
        act_mean = fold_stats.abs_sum / jnp.maximum(fold_stats.count, 1).astype(jnp.float32)
        scales, _ = awq_scales(
            w, mean_hessian(fold_stats), act_mean, config=config.quant_config(), grid=config.grid
        )
        params = fold_scales(params, fold, scales)
        input_scale.update({p: scales for p in fold.layers})
    leaves = leaves_by_path(params)
    stored = {}
    for name, config in targets.items():
        layer_stats = stats.get(name)
        if layer_stats is None or int(layer_stats.count) == 0:
            warnings.warn(
                f"{name}: no calibration tokens reached this layer; falling back to "
                "round-to-nearest",
                UserWarning,
                stacklevel=2,
            )
            stored[name] = quant.quantize(
                leaves[name], config.bits, group_size=config.group_size, symmetric=config.symmetric
            )
            continue
        h = mean_hessian(layer_stats)
        if name in input_scale:
            h = h / jnp.outer(input_scale[name], input_scale[name])
        stored[name] = quantize_clipped(leaves[name], h, config.quant_config(), clip=config.clip)
    return replace_leaves(params, stored)
