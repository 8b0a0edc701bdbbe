"""Running unmodified Flax Linen models on params trees that hold :class:`QArray` kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp.quant._matmul import DOT_GENERALS
from jaxcomp.quant._qarray import QArray
from jaxcomp.quant._tree import dequantize_tree

MODES = tuple(DOT_GENERALS)


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)


def _check_mode(mode: str) -> None:
    if mode not in DOT_GENERALS:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES}")


def _compute_dtype(module, x: jax.Array, q: QArray, bias) -> Any:
    if module.dtype is not None:
        return jnp.dtype(module.dtype)
    dtype = jnp.promote_types(x.dtype, q.dtype)
    return dtype if bias is None else jnp.promote_types(dtype, bias.dtype)


def _bias(module):
    use = getattr(module, "use_bias", False)
    return module.get_variable("params", "bias") if use else None


def _dense(module, q: QArray, mode: str, inputs, *args, **kwargs):
    if args or kwargs:
        raise TypeError(f"{module.path}: Dense takes only inputs; got extra {args}, {kwargs}")
    bias = _bias(module)
    dtype = _compute_dtype(module, inputs, q, bias)
    x = jnp.asarray(inputs).astype(dtype)
    y = DOT_GENERALS[mode](x, q, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y = y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def _einsum(module, q: QArray, mode: str, inputs, einsum_str=None):
    einsum_str = einsum_str if einsum_str is not None else module.einsum_str
    spec = einsum_str.replace(" ", "") if isinstance(einsum_str, str) else ""
    if "..." in spec or "->" not in spec or spec.count(",") != 1:
        raise ValueError(
            f"{module.path}: einsum_str {einsum_str!r} is not supported with a quantized "
            "kernel; expected 'lhs,rhs->out' with explicit letters (no '...')"
        )
    operands, out = spec.split("->")
    lhs, rhs = operands.split(",")
    if len(lhs) != inputs.ndim or len(rhs) != len(q.shape):
        raise ValueError(
            f"{module.path}: einsum_str {einsum_str!r} does not match inputs of rank "
            f"{inputs.ndim} and a kernel of shape {q.shape}"
        )
    lonely = [c for c in lhs + rhs if c not in out and (c not in lhs or c not in rhs)]
    if lonely:
        raise ValueError(
            f"{module.path}: einsum_str {einsum_str!r} sums over {lonely} within one operand; "
            "only contractions between inputs and kernel are supported"
        )
    contract = [c for c in lhs if c in rhs and c not in out]
    batch = [c for c in lhs if c in rhs and c in out]
    dims = (
        (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
        (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
    )
    bias = _bias(module)
    dtype = _compute_dtype(module, inputs, q, bias)
    y = DOT_GENERALS[mode](jnp.asarray(inputs).astype(dtype), q, dims)
    order = batch + [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
    y = jnp.transpose(y, [order.index(c) for c in out])
    if bias is not None:
        shape = [q.shape[rhs.index(c)] if c in rhs else 1 for c in out]
        y = y + bias.astype(dtype).reshape(shape)
    return y


def _dequantized_call(module, method_name: str, args, kwargs):
    variables = dequantize_tree(dict(module.variables))
    return module.clone(parent=None).apply(variables, *args, method=method_name, **kwargs)


@contextlib.contextmanager
def quantized_execution(mode: str = "w8a8") -> Iterator[None]:
    """Runs Flax Linen modules whose params hold :class:`QArray` kernels, unmodified.

    Inside the context, every call of a Linen module whose own ``kernel`` param is
    a QArray is intercepted (``flax.linen.intercept_methods``):

    * ``nn.Dense`` and ``nn.Einsum`` (explicit ``"lhs,rhs->out"`` strings) compute
      ``x @ W + b`` with the quantized dot of ``mode``: ``"w8a8"`` (int8 x int8 ->
      int32 with per-token activation scales, :func:`w8a8_dot_general`; needs
      symmetric per-channel int8 kernels), ``"fp8"`` (:func:`fp8_dot_general`,
      ``fmt="fp8_e4m3"`` kernels) or ``"weight_only"`` (dequantize inside the
      program, :func:`weight_only_dot_general`; any QArray).
    * any other module (``nn.Conv``, ``nn.DenseGeneral``, ...) with QArray params
      runs on its dequantized params (weight-only in every mode).

    Modules with float kernels run as usual, so a partly quantized tree works.
    The dtype rules follow Flax: ``module.dtype``, else the promotion of input,
    kernel and bias dtypes.

    Args:
      mode: ``"w8a8"``, ``"fp8"`` or ``"weight_only"``.

    Yields:
      Nothing; use as a ``with`` block around ``model.apply``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxcomp.quant import quantize_tree
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((2, 4)))["params"]
      >>> qparams = quantize_tree(params)          # int8 per-channel kernel
      >>> with quantized_execution("w8a8"):
      ...     y = model.apply({"params": qparams}, jnp.ones((2, 4)))
      >>> y.shape, y.dtype
      ((2, 3), dtype('float32'))
    """
    import flax.linen as nn

    _check_mode(mode)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        # only the module's own params; submodules' params are nested mappings
        own = {k: v for k, v in module.variables.get("params", {}).items() if _is_qarray(v)}
        if not own:
            return next_fun(*args, **kwargs)
        kernel = own.get("kernel")
        if isinstance(kernel, QArray) and type(module) is nn.Dense:
            return _dense(module, kernel, mode, *args, **kwargs)
        if isinstance(kernel, QArray) and type(module) is nn.Einsum:
            return _einsum(module, kernel, mode, *args, **kwargs)
        return _dequantized_call(module, context.method_name, args, kwargs)

    with nn.intercept_methods(interceptor):
        yield


def quantized_apply(model, variables: dict, *args, mode: str = "w8a8", **kwargs) -> Any:
    """``model.apply(variables, *args, **kwargs)`` inside :func:`quantized_execution`.

    Args:
      model: a Flax Linen module (unmodified).
      variables: ``{"params": qparams, ...}`` where ``qparams`` holds QArray
        kernels (e.g. from :func:`quantize_tree`).
      *args, **kwargs: passed to ``model.apply``.
      mode: ``"w8a8"``, ``"fp8"`` or ``"weight_only"``.

    Returns:
      What ``model.apply`` returns.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxcomp.quant import QuantConfig, quantize_tree
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((2, 4)))["params"]
      >>> qparams = quantize_tree(params, default=QuantConfig(bits=4))
      >>> quantized_apply(model, {"params": qparams}, jnp.ones((2, 4)), mode="weight_only").shape
      (2, 3)
    """
    _check_mode(mode)
    with quantized_execution(mode):
        return model.apply(variables, *args, **kwargs)
