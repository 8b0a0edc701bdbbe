"""Score functions fed by training or calibration: movement (optax state) and Wanda.

Both give score trees for ``compute_masks(params, scores=...)`` (larger = kept).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from jaxcomp.rules import PyTree
from jaxcomp.sparsity._masks import Params, _check_tree, _is_none


class MovementState(NamedTuple):
    """State of :func:`track_movement`: the running movement score of every leaf."""

    scores: PyTree


def movement_scores(params: Params, grads: PyTree) -> PyTree:
    """One step's movement score, :math:`-w \\odot g`, leaf by leaf (float32).

    .. math::

        S = -\\sum_t w^{(t)} \\odot g^{(t)}

    summed over steps (:func:`track_movement` keeps the sum). Weights moving away
    from zero (:math:`w g < 0` under gradient descent) score high.

    Args:
      params: params pytree.
      grads: gradient tree of the same structure.

    Returns:
      A float32 tree like ``params`` (``None`` leaves stay ``None``).

    >>> import jax.numpy as jnp
    >>> movement_scores({"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([-1.0, -3.0])})["w"]
    Array([ 2., -3.], dtype=float32)

    References: Sanh et al., Movement Pruning: Adaptive Sparsity by Fine-Tuning, 2020.
    """
    _check_tree(params, grads, what="grads")
    return jax.tree.map(
        lambda w, g: (
            None
            if w is None
            else -(jnp.asarray(w).astype(jnp.float32) * jnp.asarray(g).astype(jnp.float32))
        ),
        params,
        grads,
        is_leaf=_is_none,
    )


def track_movement() -> optax.GradientTransformation:
    """An identity optax transform that accumulates movement scores in its state.

    .. math::

        S^{(t+1)} = S^{(t)} - w^{(t)} \\odot g^{(t)}

    with :math:`g` the incoming updates (put it first in the chain, where they are
    the gradients). Read ``state.scores`` and pass them to
    ``compute_masks(params, scores=...)``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`MovementState`;
      ``update`` requires ``params`` and returns the updates unchanged.

    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(track_movement(), optax.sgd(0.1))
    >>> params = {"w": jnp.array([1.0, -1.0])}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([-2.0, -2.0])}, state, params)
    >>> state[0].scores["w"]
    Array([ 2., -2.], dtype=float32)

    References: Sanh et al., Movement Pruning: Adaptive Sparsity by Fine-Tuning, 2020.
    """

    def init_fn(params):
        return MovementState(
            jax.tree.map(
                lambda w: None if w is None else jnp.zeros(jnp.shape(w), jnp.float32),
                params,
                is_leaf=_is_none,
            )
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("track_movement needs params: call update(updates, state, params)")
        step = movement_scores(params, updates)
        scores = jax.tree.map(
            lambda s, d: None if s is None else s + d, state.scores, step, is_leaf=_is_none
        )
        return updates, MovementState(scores)

    return optax.GradientTransformation(init_fn, update_fn)


def wanda_scores(kernel: ArrayLike, input_norms: ArrayLike) -> jax.Array:
    """Wanda importance of a Dense kernel ``[in, out]``: weight magnitude times input-feature norm.

    .. math::

        S_{ij} = |W_{ij}| \\cdot \\lVert X_{:, i} \\rVert_2

    where :math:`X` stacks the layer's calibration inputs (rows = tokens). Compare
    within output columns: ``compute_masks(params, scores=..., scope="output")``.

    Args:
      kernel: ``[in, out]`` (or ``[..., in, out]``: the norms broadcast over the
        contraction axis, which must be the second-to-last).
      input_norms: ``[in]`` non-negative, e.g. :func:`input_norms`.

    Returns:
      float32 array of ``kernel``'s shape.

    Raises:
      ValueError: the norms' length differs from the kernel's input size.

    >>> import jax.numpy as jnp
    >>> wanda_scores(jnp.array([[1.0, -2.0], [3.0, 1.0]]), jnp.array([2.0, 0.5]))
    Array([[2. , 4. ],
           [1.5, 0.5]], dtype=float32)

    References: Sun et al., A Simple and Effective Pruning Approach for Large
    Language Models, 2023.
    """
    kernel = jnp.asarray(kernel)
    norms = jnp.asarray(input_norms)
    if kernel.ndim < 2 or norms.shape != kernel.shape[-2:-1]:
        raise ValueError(
            f"kernel of shape {kernel.shape} needs input_norms of shape {kernel.shape[-2:-1]} "
            f"(one per input feature); got {norms.shape}"
        )
    return jnp.abs(kernel.astype(jnp.float32)) * norms.astype(jnp.float32)[:, None]


def input_norms(x: ArrayLike) -> jax.Array:
    """Per-feature L2 norm of calibration inputs ``[..., in]`` over all leading axes.

    .. math::

        n_i = \\sqrt{\\textstyle\\sum_{t} X_{t, i}^2}

    Accumulate over batches as ``sqrt(sum of squares)``.

    Args:
      x: activations entering a layer, features last.

    Returns:
      float32 ``[in]``.

    >>> import jax.numpy as jnp
    >>> input_norms(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
    Array([5., 1.], dtype=float32)
    """
    x = jnp.asarray(x).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(-1, x.shape[-1])), axis=0))
