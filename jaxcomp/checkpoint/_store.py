"""The checkpoint API: save, restore, read_metadata, disk_bytes and is_checkpoint."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxcomp
from jaxcomp.checkpoint import _files, _spec
from jaxcomp.checkpoint._files import CheckpointError
from jaxcomp.rules import PyTree, path_str


def save(
    path: str | os.PathLike, tree: PyTree, *, metadata: dict | None = None, overwrite: bool = False
) -> None:
    """Writes ``tree`` to the checkpoint directory ``path``.

    Args:
      path: checkpoint directory (parents are created).
      tree: nested dicts/lists/tuples/namedtuples or ``nnx.State`` of arrays (any
        dtype, ``jax.Array`` or numpy), ``None``, Python scalars and registered
        node types such as ``QArray``.
      metadata: JSON-like dict stored with the checkpoint (e.g. the rules used),
        returned by :func:`read_metadata`.
      overwrite: replace an existing checkpoint at ``path``; the old one stays
        intact until the new one is complete.

    Returns:
      None.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, {"w": jnp.ones((2, 2), jnp.int8), "mask": None})
      >>> restore(path)["w"].dtype
      dtype('int8')
    """
    target = _files.as_path(path)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata is a {type(metadata).__name__}; expected a dict or None")
    arrays: dict[str, Any] = {}
    spec = _spec.encode(tree, (), arrays)
    leaves = {
        path_str(kp): _spec.leaf_info(s) for kp, s in _spec.walk(spec, (), stop_at_nodes=True)
    }
    body = {
        "format": _files.FORMAT,
        "format_version": _files.FORMAT_VERSION,
        "jaxcomp_version": jaxcomp.__version__,
        "orbax_version": ocp.__version__,
        "metadata": _spec.to_json(metadata or {}, "metadata"),
        "leaves": leaves,
        "nbytes": sum(info["nbytes"] for info in leaves.values()),
        "tree": spec,
    }
    stored = {k: v for k, v in arrays.items() if v.size}
    target.parent.mkdir(parents=True, exist_ok=True)
    with _files.save_lock(target):
        if os.path.lexists(target):
            if not overwrite:
                raise CheckpointError(
                    f"checkpoint path {target} already exists; pass overwrite=True to replace it"
                )
            if not (target / _files.SIDECAR).is_file():
                raise CheckpointError(
                    f"{target} exists and is not a jaxcomp checkpoint (no {_files.SIDECAR}); "
                    "refusing to overwrite it"
                )
        _files.remove_leftovers(target)
        staging = _files.sibling(target, "tmp")
        try:
            staging.mkdir()
            if stored:
                with ocp.PyTreeCheckpointer() as ckptr:
                    ckptr.save(staging / _files.ARRAYS, args=ocp.args.PyTreeSave(stored))
            _files.write_sidecar(staging, body)
            _files.swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def restore(
    path: str | os.PathLike,
    template: PyTree | None = None,
    *,
    shardings: jax.sharding.Sharding | PyTree | None = None,
) -> PyTree:
    """Reads a checkpoint written by :func:`save`, checking every file first.

    Args:
      path: checkpoint directory.
      template: optional tree of the expected structure (arrays,
        ``jax.ShapeDtypeStruct``, ``QArray``, ``nnx.State`` ...). Its containers
        and node meta fields must match the checkpoint and its shapes must
        equal the saved ones; arrays are cast to its dtypes and placed with its
        shardings, and the result has its pytree types.
      shardings: one ``jax.sharding.Sharding`` for every array, or a tree whose
        entries (a ``Sharding`` or ``None`` for default placement) cover every
        array leaf, a subtree such as a ``QArray`` sharing its entry.

    Returns:
      The tree. Without template or sharding, arrays saved from JAX come back
      as ``jax.Array`` on the first device and numpy arrays as numpy arrays.

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, [jnp.zeros(3, jnp.bfloat16), (1, 2.5)])
      >>> restore(path)
      [Array([0, 0, 0], dtype=bfloat16), (1, 2.5)]
    """
    root = _files.checkpoint_dir(path)
    doc = _files.read_sidecar(root)
    _files.verify_files(root, doc["files"])
    spec = doc["tree"]
    leaf_paths = [path_str(kp) for kp, _ in _spec.walk(spec, ())]
    pick = _sharding_picker(shardings, leaf_paths)
    tleaves, treedef = None, None
    if template is not None:
        _spec.compare(spec, _spec.encode(template, (), None), ())
        flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_spec.is_none)
        tleaves = {path_str(kp): leaf for kp, leaf in flat}
    targets = {}
    for kp, s in _spec.walk(spec, ()):
        if s["type"] != "array":
            continue
        name = path_str(kp)
        kind, dtype, sharding = s["kind"], jnp.dtype(s["dtype"]), pick(name)
        if tleaves is not None:
            t = tleaves[name]
            kind = "jax" if isinstance(t, jax.Array | jax.ShapeDtypeStruct) else _spec.kind(t)
            dtype = jnp.dtype(t.dtype)
            if sharding is None and kind == "jax":
                sharding = t.sharding
        if sharding is not None:
            kind = "jax"
        targets[s["key"]] = (s, kind, dtype, sharding)
    arrays = _read_arrays(root, targets)
    try:
        tree = _spec.decode(spec, arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot rebuild the tree described by {root / _files.SIDECAR}: {e}"
        ) from e
    if treedef is None:
        return tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_spec.is_none)[0]
    found = {path_str(kp): v for kp, v in flat}
    return jax.tree_util.tree_unflatten(treedef, [found[name] for name in tleaves])


def read_metadata(path: str | os.PathLike) -> dict:
    """The sidecar of a checkpoint, without reading its arrays.

    Args:
      path: checkpoint directory.

    Returns:
      A dict with ``format``, ``format_version``, ``jaxcomp_version``,
      ``orbax_version``, ``metadata`` (what the caller passed to :func:`save`),
      ``leaves`` (per leaf path: ``type``, ``dtype``, ``shape``, ``nbytes``, and for
      node types their meta fields, e.g. ``bits`` and ``group_size``, and
      ``arrays``) and ``nbytes`` (bytes the arrays hold in memory; Python scalars,
      kept in the JSON, count 0).

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, {"b": jnp.zeros(4)}, metadata={"step": 3})
      >>> meta = read_metadata(path)
      >>> meta["metadata"], meta["leaves"]["b"]["nbytes"]
      ({'step': 3}, 16)
    """
    doc = _files.read_sidecar(_files.checkpoint_dir(path))
    doc["metadata"] = _spec.from_json(doc["metadata"])
    return {k: v for k, v in doc.items() if k not in ("tree", "files")}


def disk_bytes(path: str | os.PathLike) -> int:
    """Total size of all files under a checkpoint directory, from ``os.stat``.

    Args:
      path: checkpoint directory.

    Returns:
      The sum of ``st_size`` over every file (links not followed).

    Example:
      >>> import tempfile, jax.numpy as jnp
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, {"w": jnp.ones((64, 64), jnp.int8)})
      >>> disk_bytes(path) > 0
      True
    """
    root = _files.checkpoint_dir(path)
    return sum(
        os.stat(os.path.join(d, f), follow_symlinks=False).st_size
        for d, _, files in os.walk(root)
        for f in files
    )


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a jaxcomp checkpoint (its ``jaxcomp.json``)."""
    return (Path(path) / _files.SIDECAR).is_file()


def _sharding_picker(shardings: Any, leaf_paths: list[str]):
    """Function from an array's path to its sharding (None = default placement)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return lambda name: shardings
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding)
    )[0]
    table = {}
    for kp, s in flat:
        if s is not None and not isinstance(s, jax.sharding.Sharding):
            raise TypeError(
                f"shardings entry '{_spec.where(kp)}' is {s!r}; expected a Sharding or None"
            )
        table[path_str(kp)] = s
    parts = [p.split("/") for p in leaf_paths]
    prefixes = {"/".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}
    for name in table:
        if name not in prefixes:
            raise ValueError(f"shardings entry '{name}' matches no leaf of the checkpoint")

    def pick(name: str):
        parts = name.split("/")
        for i in range(len(parts), 0, -1):
            prefix = "/".join(parts[:i])
            if prefix in table:
                return table[prefix]
        raise ValueError(f"shardings has no entry for the array leaf '{name}'")

    return pick


def _read_arrays(root: Path, targets: dict) -> dict:
    """Restores the arrays; ``targets`` maps key -> (spec, kind, dtype, sharding)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    args, out = {}, {}
    for key, (spec, kind, dtype, sharding) in targets.items():
        shape, saved = tuple(spec["shape"]), jnp.dtype(spec["dtype"])
        if math.prod(shape) == 0:
            empty = np.zeros(shape, dtype)
            out[key] = jax.device_put(empty, sharding or default) if kind == "jax" else empty
        elif kind == "jax":
            cast = None if dtype == saved else dtype
            args[key] = ocp.ArrayRestoreArgs(
                sharding=sharding or default, dtype=cast, global_shape=shape
            )
        else:
            args[key] = ocp.RestoreArgs(restore_type=np.ndarray)
    if args:
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                read = ckptr.restore(
                    root / _files.ARRAYS, args=ocp.args.PyTreeRestore(restore_args=args)
                )
        except Exception as e:
            raise CheckpointError(f"cannot read the arrays in {root / _files.ARRAYS}: {e}") from e
        for key in args:
            spec, kind, dtype, _ = targets[key]
            value = read.get(key) if isinstance(read, dict) else None
            if value is None or tuple(value.shape) != tuple(spec["shape"]):
                raise CheckpointError(
                    f"{root / _files.ARRAYS} does not hold array {key} as recorded"
                )
            out[key] = value if kind == "jax" else np.asarray(value).astype(dtype, copy=False)
    return {k: v[()] if targets[k][1] == "numpy_scalar" else v for k, v in out.items()}
