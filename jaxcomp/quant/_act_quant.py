"""Activation fake quantization for QAT: dynamic symmetric scales, clipped straight-through.

:func:`fake_quant_activation` fake-quantizes one array; :func:`fake_quant_activations`
is a context manager that applies it to the inputs of every ``nn.Dense``,
``nn.Einsum`` and ``nn.Conv`` call of an unmodified Flax Linen model (through
``flax.linen.intercept_methods``, like :func:`quantized_execution`); for NNX
models (and Linen models built with a ``dot_general`` argument)
:func:`fake_quant_dot_general` gives a ``dot_general`` that does the same.
With :func:`fake_quantize_tree` on the params this simulates W8A8 (or
W4A4, ...) inference in a float train step.

References:
  Jacob et al., Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference, 2018.
  Bengio et al., Estimating or Propagating Gradients Through Stochastic Neurons
  for Conditional Computation, 2013.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

GRANULARITIES = ("token", "tensor")


def _check(bits, granularity, clip_ratio) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits is {bits!r}; expected an int from 2 to 8")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity is {granularity!r}; expected one of {GRANULARITIES}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio is {clip_ratio!r}; expected 0 < clip_ratio <= 1")


def _forward(x: jax.Array, bits: int, axes: tuple[int, ...] | None, clip_ratio: float):
    """Fake-quantized ``x`` and the mask of entries whose code was not clipped."""
    top = float((1 << (bits - 1)) - 1)
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True) * clip_ratio
    scale = jnp.where(amax > 0, amax / top, jnp.ones_like(amax))
    v = jnp.round(x32 / scale)
    inside = jnp.abs(v) <= top
    return (jnp.clip(v, -top, top) * scale).astype(x.dtype), inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fake_quant(x, bits, axes, clip_ratio):
    return _forward(x, bits, axes, clip_ratio)[0]


def _fake_quant_fwd(x, bits, axes, clip_ratio):
    return _forward(x, bits, axes, clip_ratio)


def _fake_quant_bwd(bits, axes, clip_ratio, inside, g):
    del bits, axes, clip_ratio
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant_activation(
    x: ArrayLike,
    bits: int = 8,
    *,
    axis: int | Sequence[int] = -1,
    granularity: str = "token",
    clip_ratio: float = 1.0,
) -> jax.Array:
    """Dynamic symmetric fake quantization of activations with a clipped straight-through gradient.

    With :math:`Q = 2^{b-1} - 1` and the absolute maximum taken per token (over
    ``axis``, the contraction axes) or over the whole tensor:

    .. math::

        s = \\frac{r \\max |x|}{Q}, \\qquad
        \\hat{x} = s \\cdot \\mathrm{clip}(\\mathrm{round}(x / s), -Q, Q), \\qquad
        \\frac{\\partial L}{\\partial x} = \\frac{\\partial L}{\\partial \\hat{x}}
        \\cdot \\mathbb{1}\\left[|\\mathrm{round}(x / s)| \\le Q\\right]

    (``s = 1`` for an all-zero row). The scale is recomputed from every batch and
    treated as a constant. With ``clip_ratio`` ``r = 1`` nothing clips and the
    gradient passes unchanged; ``r < 1`` clips outliers (gradient 0 there). For
    ``bits=8`` and ``r = 1`` the values are those of :func:`quantize_activations`
    (codes in ``[-127, 127]``), so the forward pass matches W8A8 execution.

    Args:
      x: float activations.
      bits: code width, 2 to 8.
      axis: the axis or axes that share one scale for ``granularity="token"``.
      granularity: ``"token"`` (a scale per row over ``axis``) or ``"tensor"``.
      clip_ratio: fraction of the absolute maximum mapped to ``Q``, in ``(0, 1]``.

    Returns:
      An array of ``x``'s shape and dtype holding values on the grid.

    Raises:
      TypeError: non-float ``x``.
      ValueError: ``bits``, ``granularity``, ``clip_ratio`` or ``axis`` out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[0.1, -0.6, 1.0], [2.0, 0.0, -1.0]])
      >>> fake_quant_activation(x, bits=3)
      Array([[ 0.       , -0.6666667,  1.       ],
             [ 2.       ,  0.       , -1.3333334]], dtype=float32)
      >>> jax.grad(lambda x: fake_quant_activation(x, bits=3, clip_ratio=0.5).sum())(x)
      Array([[1., 0., 0.],
             [0., 1., 1.]], dtype=float32)

    References:
      Jacob et al., Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference, 2018.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"fake_quant_activation expects float activations; got dtype {x.dtype}")
    _check(bits, granularity, clip_ratio)
    axes = None
    if granularity == "token":
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if any(not -x.ndim <= a < x.ndim for a in axes):
            raise ValueError(f"axis is {axis!r} for activations of rank {x.ndim}")
        axes = tuple(sorted(a % x.ndim for a in axes))
    return _fake_quant(x, bits, axes, float(clip_ratio))


def _einsum_contraction(spec: str, ndim: int, path: str) -> tuple[int, ...]:
    """Axes of the lhs of ``"lhs,rhs->out"`` summed against the kernel (``...`` allowed)."""
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"{path}: einsum_str {spec!r} is not of the form 'lhs,rhs->out'")
    operands, out = spec.split("->")
    lhs, rhs = operands.split(",")
    head, _, tail = lhs.partition("...")
    letters = head + tail
    if "..." not in lhs and len(lhs) != ndim:
        raise ValueError(f"{path}: einsum_str {spec!r} does not match inputs of rank {ndim}")
    axes = [i for i, c in enumerate(head) if c in rhs and c not in out]
    axes += [ndim - len(tail) + i for i, c in enumerate(tail) if c in rhs and c not in out]
    if not axes or len(letters) > ndim:
        raise ValueError(f"{path}: einsum_str {spec!r} has no contraction with the kernel")
    return tuple(axes)


@contextlib.contextmanager
def fake_quant_activations(
    bits: int = 8,
    *,
    granularity: str = "token",
    clip_ratio: float = 1.0,
    modules: str | None = None,
) -> Iterator[None]:
    """Fake-quantizes the inputs of Linen ``Dense``, ``Einsum`` and ``Conv`` calls (QAT).

    Inside the context, every ``__call__`` of an ``nn.Dense``, ``nn.Einsum`` or
    ``nn.Conv`` (subclasses included) whose path matches ``modules`` gets its
    input replaced by :func:`fake_quant_activation` of it: per token, the scale is
    shared along the contraction axes (the last axis for Dense and Conv, i.e.
    one scale per token or pixel; the lhs axes summed against the kernel for
    Einsum). Use it around ``model.apply`` inside the loss of a jitted train step,
    with :func:`fake_quantize_tree` on the float master params for the weights;
    the gradient is the clipped straight-through estimator. With int8 weights
    and activations the forward pass equals :func:`quantized_apply` with
    ``mode="w8a8"`` up to float rounding.

    Args:
      bits: activation code width, 2 to 8.
      granularity: ``"token"`` or ``"tensor"`` (one scale per call).
      clip_ratio: fraction of the absolute maximum mapped to the largest code.
      modules: a regex searched in the module path (``"Dense_0"``,
        ``"block/attn/q"``); ``None`` matches every module.

    Yields:
      Nothing; use as a ``with`` block around ``model.apply``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxcomp.quant import fake_quantize_tree
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((2, 4)))["params"]
      >>> def loss(p, x):
      ...     with fake_quant_activations(bits=8):
      ...         return model.apply({"params": fake_quantize_tree(p)}, x).sum()
      >>> grads = jax.jit(jax.grad(loss))(params, jnp.ones((2, 4)))
      >>> grads["kernel"].shape
      (4, 3)

    References:
      Jacob et al., Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference, 2018.
    """
    import flax.linen as nn

    _check(bits, granularity, clip_ratio)
    pattern = None if modules is None else re.compile(modules)
    kinds = (nn.Dense, nn.Einsum, nn.Conv)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, kinds) or not args:
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.path)
        if pattern is not None and not pattern.search(path):
            return next_fun(*args, **kwargs)
        x = jnp.asarray(args[0])
        axis = (x.ndim - 1,)
        if isinstance(module, nn.Einsum):
            spec = args[1] if len(args) > 1 else kwargs.get("einsum_str", module.einsum_str)
            axis = _einsum_contraction(spec, x.ndim, path)
        x = fake_quant_activation(
            x, bits, axis=axis, granularity=granularity, clip_ratio=clip_ratio
        )
        return next_fun(x, *args[1:], **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _fake_quant_dot(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
    bits: int,
    granularity: str,
    clip_ratio: float,
):
    lhs = jnp.asarray(lhs)
    (lc, _), _ = dimension_numbers
    axis = tuple(int(d) % lhs.ndim for d in lc)
    x = fake_quant_activation(lhs, bits, axis=axis, granularity=granularity, clip_ratio=clip_ratio)
    return jax.lax.dot_general(
        x,
        rhs,
        dimension_numbers,
        precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )


def fake_quant_dot_general(
    bits: int = 8, *, granularity: str = "token", clip_ratio: float = 1.0
) -> functools.partial:
    """A ``dot_general`` that fake-quantizes its activations (lhs): QAT for NNX and Linen.

    Pass it where a module takes ``dot_general`` (``nnx.Linear``, ``nn.Dense``,
    ``nn.DenseGeneral``); the lhs is replaced by :func:`fake_quant_activation`
    with the scale shared along the lhs contraction axes, then
    :func:`jax.lax.dot_general` runs as usual. This is the NNX counterpart of
    :func:`fake_quant_activations` (NNX has no method interception); fake-quantize
    the weights with :func:`fake_quantize_tree` on the ``nnx.State``.

    Args:
      bits, granularity, clip_ratio: as in :func:`fake_quant_activation`.

    Returns:
      A function with :func:`jax.lax.dot_general`'s signature.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = nnx.Linear(4, 2, dot_general=fake_quant_dot_general(4), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((3, 4))).shape
      (3, 2)

    References:
      Jacob et al., Quantization and Training of Neural Networks for Efficient
      Integer-Arithmetic-Only Inference, 2018.
    """
    _check(bits, granularity, clip_ratio)
    return functools.partial(
        _fake_quant_dot, bits=bits, granularity=granularity, clip_ratio=float(clip_ratio)
    )
