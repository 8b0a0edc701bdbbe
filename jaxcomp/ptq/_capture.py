"""Calibration statistics of layer inputs: streaming ``2 X^T X`` and per-feature norms.

Inputs of every ``flax.linen.Dense``, ``flax.linen.Einsum`` (kernels that contract
all axes but the last) and ``flax.nnx.Linear`` kernel are captured
during an ordinary forward pass (Linen: :func:`flax.linen.intercept_methods`;
NNX: a temporary wrapper of ``nnx.Linear.__call__``) and folded into
:class:`LayerStats` right away, inside ``jit``: the activations are never
stored, so peak memory does not depend on the number of calibration batches.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

HIGHEST = jax.lax.Precision.HIGHEST


class LayerStats(NamedTuple):
    """Running statistics of one layer's inputs ``x [tokens, K]`` (padding excluded).

    Attributes:
      hessian: ``float32 [K, K]``, :math:`\\sum_t 2 x_t x_t^T`.
      count: ``int32`` number of tokens seen.
      sq_sum: ``float32 [K]``, :math:`\\sum_t x_{tj}^2` (Wanda's :math:`\\|X_j\\|^2`).
      abs_max: ``float32 [K]``, :math:`\\max_t |x_{tj}|` (SmoothQuant).
      abs_sum: ``float32 [K]``, :math:`\\sum_t |x_{tj}|` (AWQ's mean activation magnitude).
    """

    hessian: jax.Array
    count: jax.Array
    sq_sum: jax.Array
    abs_max: jax.Array
    abs_sum: jax.Array


def init_stats(features: int) -> LayerStats:
    """Empty statistics for a layer with ``features`` inputs.

    Example:
      >>> init_stats(3).hessian.shape
      (3, 3)
    """
    z = jnp.zeros((features,), jnp.float32)
    return LayerStats(jnp.zeros((features, features), jnp.float32), jnp.int32(0), z, z, z)


def accumulate(stats: LayerStats, x: ArrayLike, where: ArrayLike | None = None) -> LayerStats:
    """Adds a batch of inputs ``x [..., K]`` to ``stats``; tokens with ``where=False`` are skipped.

    .. math::

        H \\leftarrow H + 2 \\sum_t m_t x_t x_t^T, \\qquad n \\leftarrow n + \\sum_t m_t

    in float32 at the highest matmul precision. Under a data-parallel sharded
    ``jit`` the token sum is reduced across devices by XLA; under ``pmap`` use
    :func:`psum_stats`.

    Args:
      stats: running statistics.
      x: inputs ``[..., K]``; leading axes are tokens.
      where: optional bool mask of shape ``x.shape[:-1]``.

    Returns:
      The updated statistics.

    Example:
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> s = accumulate(init_stats(2), x, jnp.array([True, False]))
      >>> s.hessian, int(s.count)
      (Array([[2., 4.],
             [4., 8.]], dtype=float32), 1)
    """
    x = jnp.asarray(x).astype(jnp.float32)
    x2 = x.reshape(-1, x.shape[-1])
    if where is None:
        m = jnp.ones((x2.shape[0],), bool)
    else:
        where = jnp.asarray(where)
        if where.shape != x.shape[:-1]:
            raise ValueError(
                f"where has shape {where.shape}; expected the token shape {x.shape[:-1]} of "
                f"inputs {x.shape}"
            )
        m = where.reshape(-1).astype(bool)
    xm = jnp.where(m[:, None], x2, 0.0)
    return LayerStats(
        stats.hessian + 2.0 * jnp.dot(xm.T, xm, precision=HIGHEST),
        stats.count + jnp.sum(m, dtype=jnp.int32),
        stats.sq_sum + jnp.sum(jnp.square(xm), axis=0),
        jnp.maximum(stats.abs_max, jnp.max(jnp.abs(xm), axis=0, initial=0.0)),
        stats.abs_sum + jnp.sum(jnp.abs(xm), axis=0),
    )


def psum_stats(stats: LayerStats, axis_name: Any) -> LayerStats:
    """Sums statistics over a ``pmap``/``shard_map`` axis (max for ``abs_max``)."""
    return LayerStats(
        jax.lax.psum(stats.hessian, axis_name),
        jax.lax.psum(stats.count, axis_name),
        jax.lax.psum(stats.sq_sum, axis_name),
        jax.lax.pmax(stats.abs_max, axis_name),
        jax.lax.psum(stats.abs_sum, axis_name),
    )


def mean_hessian(stats: LayerStats) -> jax.Array:
    """:math:`2 X^T X / n` (zero when no token was seen)."""
    return stats.hessian / jnp.maximum(stats.count, 1).astype(jnp.float32)


def einsum_inputs(einsum_str: str, inputs: jax.Array, name: str) -> jax.Array:
    """The inputs of an ``nn.Einsum`` as rows ``[..., K]`` of its kernel's matrix view.

    Supported kernels contract every axis but the last, which must be an output
    axis (e.g. ``"btnh,nhd->btd"``: kernel ``[n, h, d]`` seen as ``[n * h, d]``, as
    every per-layer algorithm views kernels); the inputs' contracted axes are
    moved last in the kernel's order and flattened.

    Raises:
      ValueError: another kernel layout (naming the layer and the equation).
    """
    spec = einsum_str.replace(" ", "")
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    contracted = rhs[:-1]
    if (
        "." in spec
        or any(c in out or c not in lhs for c in contracted)
        or rhs[-1] not in out
        or rhs[-1] in lhs
    ):
        raise ValueError(
            f"{name}: einsum {einsum_str!r} is not supported for calibration; the kernel must "
            "contract all its axes but the last, which must be an output axis "
            "(e.g. 'btnh,nhd->btd')"
        )
    free = [c for c in lhs if c not in contracted]
    perm = [lhs.index(c) for c in free + list(contracted)]
    x = jnp.transpose(inputs, perm)
    return x.reshape(*x.shape[: len(free)], -1)


@contextlib.contextmanager
def _recording(record: Callable[[str, Callable[[], jax.Array]], None], nnx_paths: dict[int, str]):
    """Calls ``record(kernel_path, get_inputs)`` for every Linen Dense / Einsum, NNX Linear call.

    ``get_inputs()`` returns the inputs as ``[..., K]`` (it raises for an Einsum
    layout that calibration does not support, so only recorded layers need one).
    """
    import flax.linen as nn
    from flax import nnx

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and args:
            path = "/".join([*(str(p) for p in module.path), "kernel"])
            if isinstance(module, nn.Dense):
                record(path, lambda: args[0])
            elif isinstance(module, nn.Einsum):
                spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
                spec = spec or module.einsum_str
                record(path, lambda: einsum_inputs(spec, args[0], path))
        return next_fun(*args, **kwargs)

    original = nnx.Linear.__call__

    @functools.wraps(original)
    def linear_call(self, inputs, *args, **kwargs):
        if id(self) in nnx_paths:
            record("/".join(filter(None, [nnx_paths[id(self)], "kernel"])), lambda: inputs)
        return original(self, inputs, *args, **kwargs)

    nnx.Linear.__call__ = linear_call
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        nnx.Linear.__call__ = original


def _forward(model, params, x):
    """Runs a Linen module, an NNX ``GraphDef`` or ``apply_fn(params, x)`` on ``x``.

    Returns the thunk and the NNX module-path map it uses.
    """
    import flax.linen as nn
    from flax import nnx

    if isinstance(model, nnx.GraphDef):
        module = nnx.merge(model, params)
        paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(module)}
        return lambda: module(x), paths
    if isinstance(model, nn.Module):
        return lambda: model.apply({"params": params}, x), {}
    if callable(model):
        return lambda: model(params, x), {}
    raise TypeError(
        f"model is {type(model).__name__}; expected a flax.linen.Module, an nnx.GraphDef "
        "or a function apply_fn(params, x) that calls Linen modules"
    )


def _layer_inputs(model, params, x, targets):
    """Traces one forward pass; returns ``({path: inputs}, order)`` (abstract under eval_shape)."""
    seen: dict[str, jax.Array] = {}

    def record(name, get_inputs):
        if name in seen:
            return
        if targets is not None and name in targets:
            seen[name] = get_inputs()
        elif targets is None:
            with contextlib.suppress(ValueError):  # untargeted: unsupported Einsums are skipped
                seen[name] = get_inputs()

    run, paths = _forward(model, params, x)
    with _recording(record, paths):
        run()
    return seen


def _first_pass(model, params, x, targets) -> tuple[list[str], list[int]]:
    """Kernel paths in call order and their input widths, from an abstract trace."""
    seen: dict[str, jax.Array] = {}

    def trace(params, x):
        seen.update(_layer_inputs(model, params, x, targets))
        return 0

    jax.eval_shape(trace, params, x)
    return list(seen), [v.shape[-1] for v in seen.values()]


@functools.partial(jax.jit, static_argnames=("model", "targets"))
def _stats_step(params, stats, x, where, *, model, targets):
    stats = dict(stats)
    calls: list[tuple[str, jax.Array]] = []

    def record(name, get_inputs):
        if name in stats:
            calls.append((name, get_inputs()))

    run, paths = _forward(model, params, x)
    with _recording(record, paths):
        run()
    for name, inputs in calls:
        if where is not None and where.shape != inputs.shape[:-1]:
            raise ValueError(
                f"{name}: the calibration mask has shape {where.shape} but the layer's inputs "
                f"have token shape {inputs.shape[:-1]}"
            )
        stats[name] = accumulate(stats[name], inputs, where)
    return stats


def capture_stats(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    *,
    targets: Iterable[str] | None = None,
) -> tuple[dict[str, LayerStats], list[str]]:
    """Streams calibration batches through a model, accumulating each kernel's input statistics.

    Args:
      model: a ``flax.linen.Module`` (called as ``model.apply({"params": params}, x)``),
        an ``nnx.GraphDef`` (called as ``nnx.merge(model, params)(x)``), or a
        hashable function ``apply_fn(params, x)`` that applies Linen modules (for
        models with several inputs: ``x`` may be any pytree). Pass the same
        function object on every call, or each call compiles anew.
      params: the Linen params dict or the ``nnx.State``.
      batches: iterable of inputs ``x`` or ``(x, where)`` pairs; ``where`` is a bool
        mask of the layers' token shape (e.g. ``[batch, seq]``; padding ``False``).
        Batches may be sharded over a data-parallel mesh (sums are reduced by XLA).
      targets: kernel paths to record (``None``: every Dense / Linear kernel and every
        Einsum kernel of a supported layout; a targeted Einsum of another layout
        is a ``ValueError``).

    Returns:
      ``(stats, order)``: ``{kernel path: LayerStats}`` and the paths in call order.

    Raises:
      ValueError: NaN or Inf in a layer's inputs (naming the layer), or a mask of
        the wrong shape.

    Example:
      >>> import flax.linen as nn
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> stats, order = capture_stats(model, params, [jnp.ones((5, 4))])
      >>> order, int(stats["kernel"].count)
      (['kernel'], 5)
    """
    targets = None if targets is None else frozenset(targets)
    stats: dict[str, LayerStats] | None = None
    order: list[str] = []
    for batch in batches:
        x, where = batch if isinstance(batch, tuple) else (batch, None)
        if stats is None:
            order, features = _first_pass(model, params, x, targets)
            stats = {name: init_stats(f) for name, f in zip(order, features, strict=True)}
        stats = _stats_step(params, stats, x, where, model=model, targets=targets)
    stats = {} if stats is None else stats
    for name, s in stats.items():
        if not bool(jnp.all(jnp.isfinite(s.hessian))):
            raise ValueError(f"{name}: NaN or Inf in the layer's calibration inputs")
    return stats, order
