"""Learned step size quantization (LSQ): fake quantization with a trainable scale."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxcomp.quant._config import MAX_BITS, MIN_BITS, _as_int


def lsq_fake_quant(
    x: ArrayLike,
    scale: ArrayLike,
    bits: int = 8,
    *,
    signed: bool = True,
    grad_scale: float | None = None,
) -> jax.Array:
    """Fake-quantizes ``x`` with a learned step size ``scale`` and the LSQ gradients.

    With the grid ``[-Q_N, Q_P]`` (``[-2^(b-1), 2^(b-1) - 1]`` signed,
    ``[0, 2^b - 1]`` unsigned) and ``v = x / s``:

    .. math::

        \\hat{x} = \\mathrm{round}(\\mathrm{clip}(v, -Q_N, Q_P)) \\cdot s, \\qquad
        \\frac{\\partial \\hat{x}}{\\partial x} = \\mathbb{1}[-Q_N \\le v \\le Q_P],

        \\frac{\\partial \\hat{x}}{\\partial s} = g \\cdot \\begin{cases}
        -Q_N & v < -Q_N \\\\ \\mathrm{round}(v) - v & -Q_N \\le v \\le Q_P \\\\
        Q_P & v > Q_P \\end{cases}, \\qquad g = \\frac{1}{\\sqrt{N Q_P}}

    where ``N`` is the number of elements sharing one scale (``x.size / scale.size``:
    the layer size for a scalar scale, as in the paper). The scale gradient is
    summed over the elements that share it.

    Args:
      x: float array.
      scale: positive float scales broadcastable to ``x`` (a scalar, or e.g.
        ``[1, out]`` per output channel of a ``[in, out]`` kernel); a trainable
        parameter, typically initialised to ``2 mean|x| / sqrt(Q_P)``.
      bits: code width, 2 to 8.
      signed: signed grid (weights) or unsigned grid (non-negative activations).
      grad_scale: overrides ``g``.

    Returns:
      The fake-quantized array, shape and dtype of ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, s = jnp.array([0.26, -0.9, 3.0]), jnp.array(0.5)
      >>> lsq_fake_quant(x, s, bits=3)
      Array([ 0.5, -1. ,  1.5], dtype=float32)
      >>> jax.grad(lambda s: lsq_fake_quant(x, s, bits=3, grad_scale=1.0).sum())(s)
      Array(3.28, dtype=float32)

    References:
      Esser et al., Learned Step Size Quantization, 2020.
    """
    x, scale = jnp.asarray(x), jnp.asarray(scale)
    for name, a in (("x", x), ("scale", scale)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"lsq_fake_quant expects a floating-point {name}; got dtype {a.dtype}")
    bits = _as_int("bits", bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits is {bits}; expected an int from {MIN_BITS} to {MAX_BITS}")
    try:
        broadcast = np.broadcast_shapes(scale.shape, x.shape)
    except ValueError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(
            f"scale of shape {scale.shape} does not broadcast to x of shape {x.shape}; "
            "use a shape like (1, out) or ()"
        )
    q_n, q_p = ((1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(x.size // max(scale.size, 1), 1) * q_p)
    return _lsq_jit(x, scale, q_n, q_p, float(grad_scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(x, scale, q_n, q_p, grad_scale):
    return _lsq_fwd(x, scale, q_n, q_p, grad_scale)[0]


def _lsq_fwd(x, scale, q_n, q_p, grad_scale):
    del grad_scale
    s = scale.astype(jnp.float32)
    v = x.astype(jnp.float32) / s
    x_hat = jnp.round(jnp.clip(v, -q_n, q_p)) * s
    return x_hat.astype(x.dtype), (v, scale)


def _lsq_bwd(q_n, q_p, grad_scale, residuals, g):
    v, scale = residuals
    inside = (v >= -q_n) & (v <= q_p)
    g32 = g.astype(jnp.float32)
    dx = jnp.where(inside, g32, 0.0).astype(g.dtype)
    dv = jnp.where(v < -q_n, -float(q_n), jnp.where(v > q_p, float(q_p), jnp.round(v) - v))
    ds = g32 * dv * grad_scale
    lead = ds.ndim - scale.ndim
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(scale.shape) if d == 1 and ds.shape[lead + i] != 1
    )
    ds = jnp.sum(ds, axis=axes).reshape(scale.shape)
    return dx, ds.astype(scale.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
_lsq_jit = jax.jit(_lsq, static_argnums=(2, 3, 4))
