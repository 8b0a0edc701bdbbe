"""Per-layer sparsity allocation: Erdos-Renyi-Kernel (ERK)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def erk_sparsities(shapes: Sequence[tuple[int, ...]], sparsity: ArrayLike) -> list:
    """Per-layer sparsities of the Erdos-Renyi-Kernel allocation for a global target.

    Layer :math:`\\ell` with shape :math:`(d_1, \\dots, d_r)` and size
    :math:`n_\\ell` gets density

    .. math::

        \\rho_\\ell = \\min\\Big(1, \\epsilon \\frac{\\sum_j d_j}{\\prod_j d_j}\\Big),
        \\qquad \\sum_\\ell \\rho_\\ell n_\\ell = (1 - s) \\sum_\\ell n_\\ell,

    where :math:`\\epsilon` is solved for; layers that would exceed density 1
    are made dense and :math:`\\epsilon` is solved again over the rest (at most
    one round per layer), as in the reference RigL code.

    Args:
      shapes: shapes of the pruned leaves.
      sparsity: global target in ``[0, 1)``; a Python float gives Python floats
        (computed in float64), a JAX scalar (traced is fine) gives float32 scalars.

    Returns:
      One sparsity per shape, in order.

    >>> [round(s, 3) for s in erk_sparsities([(100, 100), (100, 10)], 0.9)]
    [0.929, 0.61]

    References: Evci et al., Rigging the Lottery: Making All Tickets Winners, 2020.
    """
    static = isinstance(sparsity, int | float)
    if static and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is {sparsity!r}; expected a value in [0, 1)")
    xp = np if static else jnp
    dtype = np.float64 if static else jnp.float32
    sizes = xp.asarray([math.prod(s) for s in shapes], dtype)
    raw = xp.asarray([sum(s) / max(math.prod(s), 1) for s in shapes], dtype)
    budget = (1 - xp.asarray(sparsity, dtype)) * xp.sum(sizes)
    dense = xp.zeros(len(shapes), bool)
    eps = xp.zeros((), dtype)
    for _ in range(len(shapes)):
        left = budget - xp.sum(xp.where(dense, sizes, 0))
        weight = xp.sum(xp.where(dense, 0, raw * sizes))
        eps = left / xp.maximum(weight, xp.finfo(dtype).tiny)
        dense = dense | (eps * raw > 1)
    result = 1 - xp.where(dense, 1, xp.minimum(eps * raw, 1))
    return [float(x) for x in result] if static else list(result)
