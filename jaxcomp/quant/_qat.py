"""Quantization-aware training on params trees: fake-quantized forward, float master weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcomp.quant import _calibrate, _layout
from jaxcomp.quant._config import QuantConfig
from jaxcomp.quant._fake_quant import fake_quant
from jaxcomp.quant._formats import int_grid
from jaxcomp.quant._lsq import lsq_fake_quant
from jaxcomp.quant._qarray import QArray
from jaxcomp.rules import PyTree, Rules, path_str, resolve_configs

QAT_DEFAULT = QuantConfig(bits=8)
_MIN_SCALE = 1e-8  # keeps a learned step size positive in the forward pass


def _is_none(x) -> bool:
    return x is None


def _lsq_config(name: str, leaf, config) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"{name}: config is {config!r}; expected a QuantConfig or None")
    if not config.symmetric or config.fmt != "int" or config.group_size is not None:
        raise ValueError(
            f"{name}: LSQ needs a symmetric 'int' config without groups; got symmetric="
            f"{config.symmetric}, fmt={config.fmt!r}, group_size={config.group_size}"
        )
    axis = config.channel_axis
    ndim = jnp.ndim(leaf)
    if axis is not None and not -ndim <= axis < ndim:
        raise ValueError(f"{name}: channel_axis is {axis} for a leaf of rank {ndim}")
    return dataclasses.replace(config, channel_axis=None if axis is None else axis % ndim)


def _scale_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    return tuple(d if i == axis else 1 for i, d in enumerate(shape))


def init_lsq_scales(
    params: PyTree, rules: Rules | None = None, *, default: QuantConfig | None = QAT_DEFAULT
) -> PyTree:
    """Initial learned step sizes for :func:`fake_quantize_tree`: the post-training scales.

    For each leaf chosen by ``rules``/``default`` (as in :func:`quantize_tree`),
    the scale that round-to-nearest quantization would use, ``s = a / Q_P`` with
    the config's calibration (absmax, percentile or MSE clipping bound ``a``), so
    QAT starts exactly at the post-training model. Shape: ``()`` per tensor, or
    size 1 except along ``channel_axis`` (``[1, out]`` for a Dense kernel), so it
    broadcasts against the leaf. Train the scales with the params, e.g. as
    ``{"params": params, "scales": scales}`` under one optax optimizer.

    Args:
      params: float params tree.
      rules: ``[(regex, QuantConfig | None)]``.
      default: config for default targets (kernels of rank >= 2); LSQ needs
        symmetric ``fmt="int"`` configs without groups.

    Returns:
      A tree of params' structure: float32 scales, ``None`` for other leaves.

    Raises:
      ValueError: an asymmetric, grouped or non-int config (naming the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> scales = init_lsq_scales({"w": jnp.array([[1.0, -4.0], [0.5, 2.0]])},
      ...                          default=QuantConfig(bits=4))
      >>> scales["w"]
      Array([[0.14285715, 0.5714286 ]], dtype=float32)

    References:
      Esser et al., Learned Step Size Quantization, 2020.
    """
    configs = resolve_configs(params, rules, default)

    def one(path, leaf, config):
        if config is None:
            return None
        config = _lsq_config(path_str(path), leaf, config)
        xg = _calibrate.group_view(jax.lax.stop_gradient(leaf), config.channel_axis, None)
        scale, _ = _calibrate.grouped_params(xg, config)
        return scale.reshape(_scale_shape(jnp.shape(leaf), config.channel_axis))

    return jax.tree_util.tree_map_with_path(one, params, configs)


def fake_quantize_tree(
    params: PyTree,
    rules: Rules | None = None,
    *,
    default: QuantConfig | None = QAT_DEFAULT,
    scales: PyTree | None = None,
) -> PyTree:
    """The params tree as the quantized model sees it, differentiable for QAT.

    Use it inside the loss, on float master weights:
    ``model.apply({"params": fake_quantize_tree(params, rules)}, x)``. Each chosen
    leaf is replaced by

    * STE (``scales=None``): :func:`fake_quant` with its config (scales from the
      current weights, clipped straight-through gradient
      :math:`\\partial \\hat{w} / \\partial w = \\mathbb{1}[\\text{not clipped}]`);
    * LSQ (``scales`` from :func:`init_lsq_scales`):
      :func:`lsq_fake_quant` ``(w, s)`` with ``s`` learned, gradients for both.

    Other leaves pass through. Pruned zeros stay exactly 0 in the forward pass
    (0 is on every symmetric grid), so QAT composes with
    :func:`jaxcomp.sparsity.keep_masks` / :func:`jaxcomp.sparsity.prune`; the
    exported model is :func:`quantize_tree` (STE) or :func:`lsq_quantize_tree`.

    Args:
      params: float params (Linen dict, ``nnx.State`` or any pytree).
      rules: ``[(regex, QuantConfig | None)]``.
      default: config for default targets (8-bit per channel).
      scales: ``None`` (STE) or the learned scales tree (LSQ).

    Returns:
      A tree of params' structure with fake-quantized leaves.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"w": jnp.array([[0.1, -0.6], [1.0, 0.3]])}
      >>> fake_quantize_tree(params, default=QuantConfig(bits=2, channel_axis=None))["w"]
      Array([[ 0., -1.],
             [ 1.,  0.]], dtype=float32)
      >>> loss = lambda p: fake_quantize_tree(p, default=QuantConfig(bits=4))["w"].sum()
      >>> jax.grad(loss)(params)["w"]
      Array([[1., 1.],
             [1., 1.]], dtype=float32)

    References:
      Bengio et al., Estimating or Propagating Gradients Through Stochastic
      Neurons for Conditional Computation, 2013.
      Esser et al., Learned Step Size Quantization, 2020.
    """
    configs = resolve_configs(params, rules, default)
    if scales is None:

        def ste(path, leaf, config):
            if config is None:
                return leaf
            if not isinstance(config, QuantConfig):
                raise TypeError(
                    f"{path_str(path)}: config is {config!r}; expected a QuantConfig or None"
                )
            try:
                return fake_quant(leaf, **dataclasses.asdict(config))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{path_str(path)}: {e}") from None

        return jax.tree_util.tree_map_with_path(ste, params, configs)

    def lsq(path, leaf, config, scale):
        if config is None or scale is None:
            return leaf
        config = _lsq_config(path_str(path), leaf, config)
        scale = jnp.maximum(scale, _MIN_SCALE)
        return lsq_fake_quant(leaf, scale, config.bits)

    return jax.tree_util.tree_map_with_path(lsq, params, configs, scales, is_leaf=_is_none)


def lsq_quantize_tree(
    params: PyTree,
    scales: PyTree,
    rules: Rules | None = None,
    *,
    default: QuantConfig | None = QAT_DEFAULT,
) -> PyTree:
    """Exports an LSQ-trained model: QArrays with the learned scales.

    Codes ``v = clip(round(w / s), -Q_N, Q_P)``, so ``dequantize`` gives exactly
    the values the LSQ forward pass used.

    Args:
      params: float params after QAT.
      scales: learned scales (:func:`init_lsq_scales` structure).
      rules, default: the same as during training.

    Returns:
      A tree with QArray leaves where ``scales`` is not ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.array([[0.5, -1.2], [1.0, 0.4]])}
      >>> q = lsq_quantize_tree(params, {"w": jnp.array([[0.25, 0.5]])},
      ...                       default=QuantConfig(bits=3))
      >>> q["w"].dequantize()
      Array([[ 0.5 , -1.  ],
             [ 0.75,  0.5 ]], dtype=float32)
    """
    configs = resolve_configs(params, rules, default)

    def one(path, leaf, config, scale):
        if config is None or scale is None:
            return leaf
        config = _lsq_config(path_str(path), leaf, config)
        q_min, q_max = int_grid(config.bits)
        s = jnp.maximum(jnp.asarray(scale, jnp.float32), _MIN_SCALE)
        values = jnp.round(jnp.clip(leaf.astype(jnp.float32) / s, q_min, q_max))
        s = jnp.broadcast_to(s, _scale_shape(leaf.shape, config.channel_axis))
        return QArray.from_grid(
            _layout.to_2d(values, config.channel_axis),
            _layout.to_2d(s, config.channel_axis),
            bits=config.bits,
            shape=leaf.shape,
            dtype=leaf.dtype.name,
            channel_axis=config.channel_axis,
        )

    return jax.tree_util.tree_map_with_path(one, params, configs, scales, is_leaf=_is_none)
