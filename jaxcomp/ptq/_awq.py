"""AWQ: activation-aware per-input-channel scales and clipping, searched on the layer Hessian.

AWQ scales input channel ``j`` of a kernel by ``s_j`` before round-to-nearest
quantization, and divides the layer's input by ``s_j`` (folded into the previous
op, see :mod:`jaxcomp.ptq._fold`), so salient channels (large mean ``|x_j|``) keep
more precision. With ``a_j`` the mean ``|x_j|`` over calibration tokens:

.. math::

    s(\\alpha) = \\frac{a^\\alpha}{\\sqrt{\\max a^\\alpha \\cdot \\min a^\\alpha}}, \\qquad
    \\alpha^* = \\arg\\min_{\\alpha \\in \\{0, 1/n, \\dots, (n-1)/n\\}}
    \\mathrm{tr}\\, E^T H E, \\quad E = W - \\mathrm{diag}(s)^{-1} Q(\\mathrm{diag}(s) W)

with :math:`H = 2 X^T X / n`, the same output error :math:`\\lVert X W - X \\hat W \\rVert^2`
the reference implementation measures by re-running the layer on the stored
calibration activations, but here from streamed statistics: nothing but the
``[K, K]`` Hessian is kept, and each candidate costs ``O(K^2 N)`` instead of
``O(tokens K N)``. ``alpha = 0`` is plain round-to-nearest, so the search never
does worse than RTN on this loss. Then a clipping search shrinks each group's
range by a ratio in ``{1, 0.95, ..., 0.55}``, keeping per group and output column
the one with the least error ``e_g^T H_{gg} e_g`` on that group's diagonal block
of the (scaled) Hessian.

References:
  Lin et al., AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration, 2023.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp.quant import QArray, QuantConfig, _calibrate, _layout

CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(10))  # AutoAWQ: n_grid 20, max_shrink 0.5
MIN_ACTIVATION = 1e-4  # floor of the mean |x| (AutoAWQ's clamp), so dead channels get finite scales


def _check(kernel, hessian, config: QuantConfig, name: str) -> jax.Array:
    w = jnp.asarray(kernel)
    if w.ndim != 2:
        raise ValueError(f"{name}: AWQ needs a Dense kernel [in, out]; got shape {w.shape}")
    rows = w.shape[0]
    if jnp.shape(hessian) != (rows, rows):
        raise ValueError(
            f"{name}: hessian has shape {jnp.shape(hessian)}; expected ({rows}, {rows}) "
            f"for a kernel of shape {w.shape}"
        )
    if config.group_size is not None and rows % config.group_size:
        raise ValueError(
            f"{name}: group_size {config.group_size} does not divide the {rows} input rows"
        )
    return w


def _fake_quant_grouped(wg, ratio, config: QuantConfig):
    """Dequantized round-to-nearest of grouped ``[G, g, N]`` values with ranges times ``ratio``."""
    lo, hi = _calibrate._full_range(wg, config.symmetric)
    scale, zero = _calibrate._params_from_range(lo * ratio, hi * ratio, config)
    return _calibrate.from_grid(_calibrate.to_grid(wg, scale, zero, config), scale, zero)


def _groups(config: QuantConfig, rows: int) -> int:
    return rows // config.group_size if config.group_size else 1


def _alpha_losses(w2d, hessian, act_mean, config: QuantConfig, grid: int):
    """``(candidate scales [grid, K], output error of each [grid])``."""
    a = jnp.maximum(act_mean.astype(jnp.float32), MIN_ACTIVATION)
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid
    scales = a[None, :] ** alphas[:, None]
    scales = scales / jnp.sqrt(
        scales.max(axis=1, keepdims=True) * scales.min(axis=1, keepdims=True)
    )
    groups = _groups(config, w2d.shape[0])

    def loss(s):
        wq = _fake_quant_grouped(_layout.grouped(w2d * s[:, None], groups), 1.0, config)
        e = w2d - wq.reshape(w2d.shape) / s[:, None]
        return jnp.sum(e * (hessian @ e))

    return scales, jax.lax.map(loss, scales)


@functools.partial(jax.jit, static_argnames=("config", "grid"))
def awq_scales(w2d, hessian, act_mean, *, config: QuantConfig, grid: int = 20):
    """The AWQ input-channel scales ``s [K]`` of a kernel ``[K, N]`` and the loss of each alpha.

    Several kernels that read the same input (query, key, value) are searched
    together by concatenating them along ``N``.
    """
    with jax.default_matmul_precision("highest"):
        scales, losses = _alpha_losses(
            w2d.astype(jnp.float32), hessian.astype(jnp.float32), act_mean, config, grid
        )
        return scales[jnp.argmin(losses)], losses


@functools.partial(jax.jit, static_argnames=("config", "clip"))
def clipped_grid(w2d, hessian, *, config: QuantConfig, clip: bool = True):
    """Grid values ``[K, N]``, scale and zero point ``[G, N]`` after AWQ's clipping search."""
    with jax.default_matmul_precision("highest"):
        rows = w2d.shape[0]
        groups = _groups(config, rows)
        g = rows // groups
        wg = _layout.grouped(w2d.astype(jnp.float32), groups)
        h = hessian.astype(jnp.float32).reshape(groups, g, groups, g)
        blocks = h[jnp.arange(groups), :, jnp.arange(groups), :]  # [G, g, g] diagonal blocks
        lo, hi = _calibrate._full_range(wg, config.symmetric)

        def step(best, ratio):
            best_err, best_ratio = best
            e = wg - _fake_quant_grouped(wg, ratio, config)
            err = jnp.einsum("gin,gij,gjn->gn", e, blocks, e)
            better = err < best_err
            return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

        init = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
        ratios = jnp.asarray(CLIP_RATIOS if clip else (1.0,), jnp.float32)
        (_, ratio), _ = jax.lax.scan(step, init, ratios)
        scale, zero = _calibrate._params_from_range(lo * ratio, hi * ratio, config)
        values = _calibrate.to_grid(wg, scale, zero, config).reshape(w2d.shape)
        return values, scale, zero


def quantize_clipped(kernel, hessian, config: QuantConfig, *, clip: bool = True) -> QArray:
    """A :class:`QArray` of a 2-D kernel with AWQ's Hessian-weighted clipping search."""
    w = jnp.asarray(kernel)
    values, scale, zero = clipped_grid(w, hessian, config=config, clip=clip)
    return QArray.from_grid(
        values,
        scale,
        zero,
        bits=config.bits,
        shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype).name,
        channel_axis=1,  # the output axis of a 2-D kernel, as quantize() records it
        group_size=config.group_size,
    )


def awq(
    kernel: ArrayLike,
    hessian: ArrayLike,
    act_mean: ArrayLike,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool = True,
    grid: int = 20,
    clip: bool = True,
    name: str = "kernel",
) -> tuple[jax.Array, QArray]:
    """AWQ of one Dense kernel ``[in, out]``: input-channel scales, then clipped RTN.

    Returns ``(s, q)`` where ``q`` quantizes ``diag(s) @ kernel``: the layer must
    then see its input divided by ``s`` (fold ``1 / s`` into the previous op with
    :func:`jaxcomp.ptq.fold_scales`, or let :func:`jaxcomp.ptq.awq_model` do it),
    so that ``(x / s) @ q.dequantize()`` approximates ``x @ kernel``.

    Args:
      kernel: float kernel ``[K, N]``.
      hessian: ``[K, K]`` mean Hessian ``2 X^T X / n`` of the layer's inputs
        (:func:`jaxcomp.ptq.mean_hessian`).
      act_mean: ``[K]`` mean ``|x_j|`` over calibration tokens
        (``stats.abs_sum / stats.count``).
      bits: code width, 2 to 8.
      group_size: input rows sharing a scale, or ``None`` (per output column).
      symmetric: signed grid (``True``) or asymmetric with zero points.
      grid: number of alphas tried, ``0, 1/grid, ..., (grid-1)/grid``.
      clip: run the clipping search after the scale search.
      name: the layer's path, for errors.

    Returns:
      ``(s [K] float32, QArray of diag(s) @ kernel)``.

    Raises:
      ValueError: a kernel that is not 2-D, a Hessian of the wrong shape, a group
        size that does not divide ``K``, or a bad ``bits``/``grid``.

    References:
      Lin et al., AWQ: Activation-aware Weight Quantization for LLM Compression
      and Acceleration, 2023.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (256, 8)) * jnp.arange(1.0, 9.0)
      >>> w = jax.random.normal(jax.random.key(1), (8, 4))
      >>> s, q = awq(w, 2 * x.T @ x / 256, jnp.abs(x).mean(0), bits=3)
      >>> s.shape, q.shape, bool(jnp.all(s > 0))
      ((8,), (8, 4), True)
    """
    config = QuantConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid is {grid!r}; expected a positive int")
    w = _check(kernel, hessian, config, name)
    h = jnp.asarray(hessian, jnp.float32)
    s, _ = awq_scales(w, h, jnp.asarray(act_mean), config=config, grid=grid)
    return s, quantize_clipped(
        w * s[:, None].astype(w.dtype), h / jnp.outer(s, s), config, clip=clip
    )
