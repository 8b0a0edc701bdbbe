"""Structured pruning that shrinks shapes: removing the hidden neurons of consecutive Dense layers.

A *pair* ``(producer, consumer)`` names two layers by path prefix (``"Dense_0"``,
``"block_0/mlp/fc"``): the producer's kernel ``[in, h]`` and bias ``[h]`` make
``h`` hidden neurons, an elementwise activation follows, and the consumer's
kernel ``[h, out]`` reads them. Removing neuron ``j`` deletes producer column
``j``, producer bias entry ``j`` and consumer row ``j``; the smaller dense
network computes what the network with consumer row ``j`` zeroed computes (for
any activation), up to float summation order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.sparsity._masks import Masks, Params

Pair = tuple[str, str]


def _node(tree: Mapping, path: str, what: str) -> Mapping:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{what} {path!r} is not a layer of params (no {part!r} there)")
        node = node[part]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(f"{what} {path!r} has no 'kernel'; pairs name Dense layers")
    return node


def _replace(tree: Mapping, path: str, node: dict) -> dict:
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = node if not rest else _replace(tree[head], rest, node)
    return out


def _check_pairs(params: Params, pairs: Sequence[Pair]) -> list[tuple[str, str, int]]:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params is a {type(params).__name__}; structured pruning needs a params dict "
            "(for nnx.State use nnx.to_pure_dict)"
        )
    checked = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"pair {pair!r} is not a (producer, consumer) pair of layer paths")
        producer, consumer = pair
        pk = _node(params, producer, "producer")["kernel"]
        ck = _node(params, consumer, "consumer")["kernel"]
        if jnp.ndim(pk) != 2 or jnp.ndim(ck) != 2:
            raise ValueError(
                f"pair ({producer!r}, {consumer!r}) has kernels of shapes {jnp.shape(pk)} and "
                f"{jnp.shape(ck)}; both must be Dense kernels [in, out]"
            )
        if pk.shape[1] != ck.shape[0]:
            raise ValueError(
                f"producer {producer!r} has {pk.shape[1]} outputs but consumer {consumer!r} has "
                f"{ck.shape[0]} inputs; they must be consecutive layers"
            )
        checked.append((producer, consumer, int(pk.shape[1])))
    return checked


def neuron_scores(params: Params, pair: Pair) -> np.ndarray:
    """Importance of each hidden neuron of a pair: the product of its in and out weight norms.

    .. math::

        s_j = \\lVert W^{p}_{:, j} \\rVert_2 \\, \\lVert W^{c}_{j, :} \\rVert_2

    (0 for a neuron already cut on either side).

    Args:
      params: params dict.
      pair: ``(producer, consumer)`` layer paths.

    Returns:
      float64 numpy array ``[h]``.

    >>> import jax.numpy as jnp
    >>> p = {"a": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])},
    ...      "b": {"kernel": jnp.array([[1.0], [2.0]])}}
    >>> neuron_scores(p, ("a", "b"))
    array([5., 2.])
    """
    ((producer, consumer, _),) = _check_pairs(params, [pair])
    pk = np.asarray(_node(params, producer, "producer")["kernel"], np.float64)
    ck = np.asarray(_node(params, consumer, "consumer")["kernel"], np.float64)
    return np.linalg.norm(pk, axis=0) * np.linalg.norm(ck, axis=1)


def select_neurons(params: Params, pairs: Sequence[Pair], sparsity: float) -> dict[str, np.ndarray]:
    """Keeps the ``h - round(sparsity * h)`` neurons of highest :func:`neuron_scores` per pair.

    Args:
      params: params dict.
      pairs: ``(producer, consumer)`` layer paths.
      sparsity: fraction of neurons to remove, in ``[0, 1)``.

    Returns:
      ``{producer: bool [h]}`` (ties keep the lower index), for :func:`remove_neurons`.

    >>> import jax.numpy as jnp
    >>> p = {"a": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])},
    ...      "b": {"kernel": jnp.array([[1.0], [2.0]])}}
    >>> select_neurons(p, [("a", "b")], 0.5)
    {'a': array([ True, False])}
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise TypeError(f"sparsity is {sparsity!r}; expected a float in [0, 1)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity is {sparsity!r}; expected a float in [0, 1)")
    out = {}
    for producer, consumer, h in _check_pairs(params, pairs):
        scores = neuron_scores(params, (producer, consumer))
        n_keep = h - round(sparsity * h)
        order = np.lexsort((np.arange(h), -scores))
        keep = np.zeros(h, bool)
        keep[order[:n_keep]] = True
        out[producer] = keep
    return out


def _keep_array(keep: Mapping, producer: str, h: int) -> np.ndarray:
    if producer not in keep:
        raise ValueError(f"keep has no entry for producer {producer!r}; keys: {sorted(keep)}")
    k = np.asarray(keep[producer])
    if k.dtype != np.bool_ or k.shape != (h,):
        raise ValueError(
            f"keep[{producer!r}] has dtype {k.dtype} and shape {k.shape}; expected bool ({h},)"
        )
    if not k.any():
        raise ValueError(f"keep[{producer!r}] removes every neuron; keep at least one")
    return k


def neuron_masks(params: Params, pairs: Sequence[Pair], keep: Mapping) -> Masks:
    """The mask tree that cuts the removed neurons in place (same shapes).

    Masks the producer kernel columns, producer bias entries and consumer kernel
    rows of removed neurons; other leaves get ``None``. The masked network
    computes what :func:`remove_neurons` computes.

    Args:
      params: params dict.
      pairs: ``(producer, consumer)`` layer paths.
      keep: ``{producer: bool [h]}`` (``True`` = kept neuron).

    Returns:
      A mask tree of ``params``.

    >>> import jax.numpy as jnp
    >>> p = {"a": {"kernel": jnp.ones((1, 2)), "bias": jnp.ones(2)},
    ...      "b": {"kernel": jnp.ones((2, 1))}}
    >>> neuron_masks(p, [("a", "b")], {"a": jnp.array([True, False])})["b"]["kernel"]
    Array([[ True],
           [False]], dtype=bool)
    """
    masks = jax.tree.map(lambda _: None, params)
    for producer, consumer, h in _check_pairs(params, pairs):
        k = jnp.asarray(_keep_array(keep, producer, h))
        pnode = dict(_node(masks, producer, "producer"))
        pshape = jnp.shape(_node(params, producer, "producer")["kernel"])
        pnode["kernel"] = _and(pnode["kernel"], jnp.broadcast_to(k[None, :], pshape))
        if "bias" in pnode:
            pnode["bias"] = _and(pnode["bias"], k)
        masks = _replace(masks, producer, pnode)
        cnode = dict(_node(masks, consumer, "consumer"))
        cshape = jnp.shape(_node(params, consumer, "consumer")["kernel"])
        cnode["kernel"] = _and(cnode["kernel"], jnp.broadcast_to(k[:, None], cshape))
        masks = _replace(masks, consumer, cnode)
    return masks


def _and(old, new):
    return new if old is None else old & new


def remove_neurons(
    params: Params, pairs: Sequence[Pair], keep: Mapping
) -> tuple[Params, dict[str, int]]:
    """Deletes the removed hidden neurons of each pair: a smaller dense params tree.

    .. math::

        W^{p} \\leftarrow W^{p}_{:, K}, \\quad b^{p} \\leftarrow b^{p}_{K}, \\quad
        W^{c} \\leftarrow W^{c}_{K, :}

    for the kept index set :math:`K`. Pairs may chain (``Dense_0 -> Dense_1 ->
    Dense_2``: ``Dense_1`` loses rows and columns). Shapes depend on ``keep``, so
    this runs outside ``jit`` (once, after training).

    Args:
      params: params dict (Linen ``params``; nested dicts).
      pairs: ``(producer, consumer)`` layer paths.
      keep: ``{producer: bool [h]}``, e.g. from :func:`select_neurons`.

    Returns:
      ``(new_params, widths)``: ``widths[producer]`` is the new hidden size, for
      building the smaller model (``MLP(features=...)``, ``GPTConfig(d_ff=...)``).

    Raises:
      ValueError: a path that is not a Dense layer of params, pairs that are not
        consecutive, or a keep vector of the wrong shape (all named).

    >>> import jax.numpy as jnp
    >>> p = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
    ...      "b": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> small, widths = remove_neurons(p, [("a", "b")], {"a": jnp.array([1, 0, 1, 1], bool)})
    >>> small["a"]["kernel"].shape, small["b"]["kernel"].shape, widths
    ((3, 3), (3, 2), {'a': 3})

    References: Li et al., Pruning Filters for Efficient ConvNets, 2017.
    """
    checked = _check_pairs(params, pairs)
    keeps = {p: np.flatnonzero(_keep_array(keep, p, h)) for p, _, h in checked}
    out = params
    for producer, consumer, _ in checked:
        index = jnp.asarray(keeps[producer])
        pnode = dict(_node(out, producer, "producer"))
        pnode["kernel"] = jnp.take(pnode["kernel"], index, axis=1)
        if "bias" in pnode:
            pnode["bias"] = jnp.take(pnode["bias"], index, axis=0)
        out = _replace(out, producer, pnode)
        cnode = dict(_node(out, consumer, "consumer"))
        cnode["kernel"] = jnp.take(cnode["kernel"], index, axis=0)
        out = _replace(out, consumer, cnode)
    return out, {p: int(index.size) for p, index in keeps.items()}
