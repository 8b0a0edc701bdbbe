"""Wanda: pruning by weight magnitude times input norm, compared within each output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxcomp import sparsity as _sparsity


def wanda(
    kernel: ArrayLike,
    input_norm: ArrayLike,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    name: str = "kernel",
) -> tuple[jax.Array, jax.Array]:
    """Prunes a Flax kernel ``[in, out]`` by the Wanda score, per output column.

    .. math::

        S_{ij} = |W_{ij}| \\cdot \\|X_{:, i}\\|_2

    with ``i`` the input feature (row of the Flax kernel) and ``j`` the output.
    Unstructured: every output column loses exactly ``round(sparsity * in)``
    entries (the lowest scores; ties to the lower index, as in
    :func:`jaxcomp.sparsity.compute_masks` with ``scope="output"``). ``"N:M"``:
    ``N`` of every ``M`` consecutive input rows are kept per column. No weight update.

    Args:
      kernel: float kernel ``[..., out]`` (contraction axes flattened).
      input_norm: ``[K]`` L2 norms of the input features over the calibration
        tokens (``sqrt(LayerStats.sq_sum)``).
      sparsity: fraction pruned (default 0.5; implied by ``"N:M"``).
      pattern: ``"unstructured"`` or ``"N:M"``.
      name: layer name for messages.

    Returns:
      ``(kernel, mask)`` with the mask ``True`` where kept.

    References:
      Sun et al., A Simple and Effective Pruning Approach for Large Language Models, 2023.

    Example:
      >>> w = jnp.array([[1.0, -1.0], [2.0, 0.5]])
      >>> w_p, keep = wanda(w, jnp.array([3.0, 1.0]))
      >>> keep
      Array([[ True,  True],
             [False, False]], dtype=bool)
    """
    kernel = jnp.asarray(kernel)
    norm = jnp.asarray(input_norm).astype(jnp.float32)
    rows = kernel.size // kernel.shape[-1] if kernel.ndim >= 2 else -1
    if kernel.ndim < 2 or norm.shape != (rows,):
        raise ValueError(
            f"{name}: input_norm has shape {norm.shape} for kernel shape {kernel.shape}; "
            "expected [in] with in = the flattened contraction size"
        )
    score = jnp.abs(kernel.astype(jnp.float32)) * norm.reshape(*kernel.shape[:-1], 1)
    scope = "output" if pattern == "unstructured" else "layer"
    # A fixed key: the default-target rules would skip a leaf named like an embedding.
    masks = _sparsity.compute_masks(
        {"w": kernel}, sparsity=sparsity, pattern=pattern, scope=scope, scores={"w": score}
    )
    keep = masks["w"]
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype)), keep
