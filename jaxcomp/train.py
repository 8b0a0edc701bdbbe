"""Train-step builders: one device (`jit`), many devices (mesh-sharded `jit`, `pmap`).

A *loss function* has the signature ``loss_fn(params, batch, key) -> (loss, metrics)``
where ``metrics`` is a dict of scalars. The builders turn it and an optax
transform (into which pruning masks and fake-quant compose) into a step
``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

Data parallelism over a 1-D ``Mesh`` with axis ``"data"``: the batch's leading
axis is split over the devices and the parameters are replicated; XLA inserts the
gradient all-reduce. The same code runs on one CPU, a GPU, or a TPU slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

DATA_AXIS = "data"


def data_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every array of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Splits the leading axis of every array in ``batch`` over the mesh's data axis.

    Raises:
      ValueError: if a leading dimension is not divisible by the number of devices.
    """
    n = mesh.devices.size

    def put(x):
        if x.shape[0] % n:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the {n} devices of the mesh; "
                f"use a batch size that is a multiple of {n}"
            )
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))

    return jax.tree.map(put, batch)


def _step_body(loss_fn: LossFn, tx: optax.GradientTransformation, reduce_grads=None):
    def step(params, opt_state, batch, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        if reduce_grads is not None:
            grads, loss, metrics = reduce_grads((grads, loss, metrics))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **metrics}

    return step


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh | None = None
) -> Callable:
    """Builds a jitted train step; data-parallel over ``mesh`` when one is given.

    Args:
      loss_fn: ``(params, batch, key) -> (loss, metrics)``, the mean over the batch.
      tx: the optax transform (chain masks, schedules, fake-quant into it).
      mesh: a 1-D data mesh from :func:`data_mesh`. Params and optimizer state are
        replicated over it, the batch is split along its leading axis.

    Returns:
      ``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.
      Params and optimizer state buffers are donated.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> loss = lambda p, b, k: (jnp.mean((b["x"] * p["w"] - b["y"]) ** 2), {})
      >>> step = make_train_step(loss, optax.sgd(0.1))
      >>> p = {"w": jnp.ones(())}
      >>> p, s, m = step(p, optax.sgd(0.1).init(p), {"x": jnp.ones(4), "y": jnp.zeros(4)},
      ...                jax.random.key(0))
      >>> round(float(p["w"]), 4)
      0.8
    """
    step = _step_body(loss_fn, tx)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(0, 1),
    )


def make_pmap_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, *, axis_name: str = "batch"
) -> Callable:
    """Builds a ``pmap`` train step that averages gradients, loss and metrics over devices.

    Inputs carry a leading device axis: params and optimizer state stacked once per
    device (:func:`stack_for_pmap`), the batch reshaped to ``[devices, per_device, ...]``,
    one key per device. New code should prefer :func:`make_train_step` with a mesh.
    """

    def pmean(tree):
        return jax.lax.pmean(tree, axis_name)

    return jax.pmap(_step_body(loss_fn, tx, pmean), axis_name=axis_name, donate_argnums=(0, 1))


def stack_for_pmap(tree: PyTree, n: int | None = None) -> PyTree:
    """Stacks ``n`` copies (default: the local device count) of every leaf for ``pmap``."""
    n = jax.local_device_count() if n is None else n
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def batch_iterator(
    arrays: dict[str, np.ndarray], batch_size: int, *, seed: int, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches of one epoch over aligned arrays, deterministic in ``(seed, epoch)``.

    >>> batches = list(batch_iterator({"x": np.arange(10)}, 4, seed=0, epoch=0))
    >>> [len(b["x"]) for b in batches]
    [4, 4]
    """
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for i in range(n // batch_size):
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield {k: v[idx] for k, v in arrays.items()}


def predict(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    x: np.ndarray,
    *,
    batch_size: int = 1024,
) -> np.ndarray:
    """Logits of ``apply_fn(params, x)`` over ``x`` in batches (the last one padded)."""
    fn = jax.jit(apply_fn)
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        pad = batch_size - len(chunk) if len(x) > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(fn(params, jnp.asarray(chunk)))[: len(chunk) - pad])
    return np.concatenate(outputs)


def accuracy(apply_fn, params: PyTree, x: np.ndarray, y: np.ndarray, *, batch_size=1024) -> float:
    """Top-1 accuracy of ``apply_fn(params, x)`` against integer labels ``y``."""
    logits = predict(apply_fn, params, x, batch_size=batch_size)
    return float(np.mean(np.argmax(logits, axis=-1) == y))
