"""Train-step builders: one device (`jit`), many devices (mesh-sharded `jit`, `pmap`).

A *loss function* has the signature ``loss_fn(params, batch, key) -> (loss, metrics)``
where ``metrics`` is a dict of scalars. The builders turn it and an optax
transform (into which pruning masks and fake-quant compose) into a step
``step(params, opt_state, batch, key) -> (params, opt_state, metrics)``.

Data parallelism over a 1-D ``Mesh`` with axis ``"data"``: the batch's leading
axis is split over the devices and the parameters are replicated (or, FSDP-style,
sharded over the same axis: :func:`shard_params`); XLA inserts the gradient
all-reduce. The same code runs on one CPU, a GPU, a TPU slice, or several
processes (``jax.distributed.initialize`` and a mesh over ``jax.devices()``).

Distillation steps (:func:`make_distill_step`) add a teacher, either its apply
function and params (optionally cast to bf16) or teacher outputs cached in the
batch, and a list of weighted loss terms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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


def _step_body(loss_fn: Callable, tx: optax.GradientTransformation, reduce_grads=None, place=None):
    """The shared step: value-and-grad, optional cross-device reduction, optax update.

    ``place`` (if given) re-applies the parameter layout (a sharding constraint) to the
    gradients, the new params and the new optimizer state. Extra positional arguments
    after ``key`` (e.g. the teacher's params) are passed through to ``loss_fn``.
    """

    def step(params, opt_state, batch, key, *extra):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, key, *extra
        )
        if reduce_grads is not None:
            grads, loss, metrics = reduce_grads((grads, loss, metrics))
        if place is not None:
            grads = place(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if place is not None:
            params, opt_state = place(params), place(opt_state)
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


# ---------------------------------------------------------------------------------------------
# Distillation steps

Term = tuple[str, float, Callable[[Any, Any, PyTree], Any]]
_PARAM_SHARDINGS = ("replicated", "fsdp")


def _fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Splits the largest axis divisible by ``n`` over the data axis; replicated if none is."""
    best = None
    for axis, size in enumerate(shape):
        if size >= n and size % n == 0 and (best is None or size > shape[best]):
            best = axis
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*[DATA_AXIS if a == best else None for a in range(len(shape))])


def param_shardings(tree: PyTree, mesh: Mesh, mode: str = "fsdp") -> PyTree:
    """The ``NamedSharding`` of every leaf of ``tree`` for ``mode`` on a 1-D data mesh.

    ``"replicated"``: every device holds everything. ``"fsdp"``: each leaf's largest
    axis divisible by the device count is split over the data axis (ZeRO-3 / FSDP
    style); leaves with no such axis (biases of odd width, scalars) are replicated.

    Raises:
      ValueError: for an unknown ``mode``.

    Example:
      >>> mesh = data_mesh(jax.devices()[:1])
      >>> tuple(param_shardings({"w": np.zeros((4, 2))}, mesh)["w"].spec)
      ('data', None)
    """
    if mode not in _PARAM_SHARDINGS:
        raise ValueError(f"param_sharding must be one of {_PARAM_SHARDINGS}; got {mode!r}")
    n = mesh.shape[DATA_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(
            mesh, _fsdp_spec(np.shape(x), n) if mode == "fsdp" else PartitionSpec()
        ),
        tree,
    )


def shard_params(tree: PyTree, mesh: Mesh, mode: str = "fsdp") -> PyTree:
    """Places ``tree`` (params or optimizer state) on ``mesh`` as :func:`param_shardings` says."""
    return jax.device_put(tree, param_shardings(tree, mesh, mode))


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """Casts the floating leaves of ``tree`` to ``dtype`` (e.g. a bf16 teacher); others unchanged.

    >>> cast_floating({"w": jnp.ones(2), "n": jnp.arange(2)}, jnp.bfloat16)["w"].dtype
    dtype(bfloat16)
    """

    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _check_terms(terms: Sequence[Term]) -> list[Term]:
    terms = list(terms)
    if not terms:
        raise ValueError("terms is empty; give at least one (name, weight, loss_fn) triple")
    names = set()
    for term in terms:
        ok = isinstance(term, tuple) and len(term) == 3
        if not ok or not isinstance(term[0], str) or not callable(term[2]):
            raise TypeError(f"each term must be a (name, weight, loss_fn) triple; got {term!r}")
        name, weight, _ = term
        if name in names or name == "loss":
            raise ValueError(f"term name {name!r} is repeated or reserved; names must be unique")
        if not isinstance(weight, int | float) or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"term {name!r} has weight {weight!r}; it must be a number >= 0")
        names.add(name)
    return terms


def distill_loss(
    student_apply: Callable[[PyTree, PyTree, jax.Array], Any],
    terms: Sequence[Term],
    *,
    teacher_apply: Callable[[PyTree, PyTree], Any] | None = None,
    teacher_dtype: Any = None,
    cache_key: str = "teacher",
    axis_name: str | None = None,
) -> Callable:
    r"""The weighted distillation loss ``(params, batch, key, teacher_params) -> (loss, metrics)``.

    .. math::

        L = \sum_i w_i\, \ell_i\big(f_s(\theta, x), \mathrm{sg}(f_t(\phi, x)), x\big)

    A term returning a ``(sum, count)`` pair (``reduction="sum_count"``) is divided
    once by its count; under ``pmap`` (``axis_name``) the count is ``psum``-ed first and
    scalar terms are divided by the device count, so that ``psum`` of the gradients is
    the gradient of the global mean, exact even when devices hold unequal counts of
    unmasked tokens.

    Args:
      student_apply: ``(params, batch, key) -> student outputs`` (any pytree: logits,
        or a dict with logits and intermediates). Put fake-quant here.
      terms: ``(name, weight, fn)`` triples; ``fn(student_out, teacher_out, batch)``
        returns a scalar mean or a ``(sum, count)`` pair. Each term is reported under
        its name in the metrics (unweighted).
      teacher_apply: ``(teacher_params, batch) -> teacher outputs``; ``None`` reads
        cached teacher outputs from ``batch[cache_key]``.
      teacher_dtype: cast the teacher's floating params to this dtype (e.g.
        ``jnp.bfloat16``) before applying it; ``None`` keeps them.
      cache_key: the batch entry holding cached teacher outputs.
      axis_name: the ``pmap`` axis, or ``None``.

    Returns:
      ``loss_fn(params, batch, key, teacher_params) -> (loss, {name: value})``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcomp.distill import kl_div
      >>> loss_fn = distill_loss(lambda p, b, k: b["x"] @ p,
      ...                        [("kl", 1.0, lambda s, t, b: kl_div(s, t))])
      >>> batch = {"x": jnp.eye(2), "teacher": jnp.zeros((2, 3))}
      >>> float(loss_fn(jnp.zeros((2, 3)), batch, None, None)[0])
      0.0

    References:
      Hinton et al., Distilling the Knowledge in a Neural Network, 2015.
    """
    terms = _check_terms(terms)

    def loss_fn(params, batch, key, teacher_params):
        if teacher_apply is None:
            if not isinstance(batch, dict) or cache_key not in batch:
                keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                raise ValueError(
                    f"no teacher_apply was given, so the batch must hold cached teacher outputs "
                    f"under {cache_key!r}; it has keys {keys}"
                )
            teacher_out = batch[cache_key]
        else:
            if teacher_dtype is not None:
                teacher_params = cast_floating(teacher_params, teacher_dtype)
            teacher_out = teacher_apply(teacher_params, batch)
        teacher_out = jax.lax.stop_gradient(teacher_out)
        student_out = student_apply(params, batch, key)
        devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
        total, metrics = jnp.zeros((), jnp.float32), {}
        for name, weight, fn in terms:
            value = fn(student_out, teacher_out, batch)
            if isinstance(value, tuple):
                s, count = value
                count = jnp.asarray(count).astype(jnp.float32)
                if axis_name is not None:
                    count = jax.lax.psum(count, axis_name)
                value = jnp.asarray(s).astype(jnp.float32) / jnp.maximum(count, 1.0)
            else:
                value = jnp.asarray(value).astype(jnp.float32) / devices
            metrics[name] = value
            total = total + jnp.float32(weight) * value
        return total, metrics

    return loss_fn


def make_distill_step(
    student_apply: Callable[[PyTree, PyTree, jax.Array], Any],
    tx: optax.GradientTransformation,
    *,
    terms: Sequence[Term],
    teacher_apply: Callable[[PyTree, PyTree], Any] | None = None,
    teacher_dtype: Any = None,
    cache_key: str = "teacher",
    mesh: Mesh | None = None,
    param_sharding: str = "replicated",
    axis_name: str | None = None,
) -> Callable:
    r"""Builds a distillation train step: jit, mesh-sharded jit (replicated or FSDP), or pmap.

    The loss is :func:`distill_loss`; only the student's params are trained. Masks
    (``jaxcomp.sparsity.keep_masks``) and schedules go into ``tx``; fake-quant goes
    into ``student_apply``.

    Args:
      student_apply, terms, teacher_apply, teacher_dtype, cache_key: as in
        :func:`distill_loss`.
      tx: the optax transform.
      mesh: a 1-D data mesh (:func:`data_mesh`, or over ``jax.devices()`` for several
        processes): the batch is split along its leading axis (:func:`shard_batch`).
      param_sharding: with a mesh, ``"replicated"`` or ``"fsdp"``; put the params,
        optimizer state (and teacher params) there with :func:`shard_params` or
        :func:`replicate`; gradients, new params and state keep that layout.
      axis_name: build a ``pmap`` step with this axis name instead (inputs carry a
        leading device axis as for :func:`make_pmap_train_step`, except the teacher
        params, which are passed once and broadcast).

    Returns:
      ``step(params, opt_state, batch, key, teacher_params) -> (params, opt_state,
      metrics)``, with ``teacher_params=None`` for cached teacher outputs. The
      params and optimizer state buffers are donated. ``metrics`` holds ``"loss"``
      and every term by name.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> from jaxcomp.distill import kl_div
      >>> step = make_distill_step(
      ...     lambda p, b, k: b["x"] @ p, optax.sgd(1.0),
      ...     terms=[("kl", 1.0, lambda s, t, b: kl_div(s, t))],
      ...     teacher_apply=lambda tp, b: b["x"] @ tp)
      >>> p, tp, x = jnp.zeros((2, 3)), jnp.eye(2, 3), jnp.eye(2)
      >>> p, s, m = step(p, optax.sgd(1.0).init(p), {"x": x}, jax.random.key(0), tp)
      >>> round(float(m["kl"]), 4)  # KL(softmax([1, 0, 0]) || uniform)
      0.1233
    """
    if mesh is not None and axis_name is not None:
        raise ValueError("give either a mesh (sharded jit) or an axis_name (pmap), not both")
    if param_sharding not in _PARAM_SHARDINGS:
        raise ValueError(
            f"param_sharding must be one of {_PARAM_SHARDINGS}; got {param_sharding!r}"
        )
    loss_fn = distill_loss(
        student_apply,
        terms,
        teacher_apply=teacher_apply,
        teacher_dtype=teacher_dtype,
        cache_key=cache_key,
        axis_name=axis_name,
    )
    if axis_name is not None:

        def psum(tree):
            return jax.lax.psum(tree, axis_name)

        return jax.pmap(
            _step_body(loss_fn, tx, psum),
            axis_name=axis_name,
            in_axes=(0, 0, 0, 0, None),
            donate_argnums=(0, 1),
        )
    place = None
    if mesh is not None:

        def place(tree):
            shardings = param_shardings(tree, mesh, param_sharding)
            return jax.lax.with_sharding_constraint(tree, shardings)

    return jax.jit(_step_body(loss_fn, tx, None, place), donate_argnums=(0, 1))
