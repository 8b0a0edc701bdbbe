"""Save and restore jaxcomp trees (params, masks, ``QArray``) with orbax-checkpoint.

A checkpoint is a directory::

    path/
      jaxcomp.json   tree structure, per-leaf formats, caller metadata, file manifest
      arrays/        orbax PyTree checkpoint of every array, in its own dtype

Arrays keep their dtype on disk (int8 codes stay int8, packed 4-bit codes stay
``uint8``), so the files are really compressed. Containers (dicts, lists,
tuples, namedtuples), ``None`` leaves, Python scalars and the dataclass node
types of a small registry (``QArray``, extensible with
:func:`register_node_type`) are described in the JSON sidecar, whose node
entries hold the array children and the static meta fields. Nothing is pickled.

``flax.nnx.State`` is saved as its ``nnx.to_pure_dict`` (``nnx.Variable``
wrappers anywhere are saved as their values). :func:`restore` without a
template returns that pure dict (put it back with
``nnx.replace_by_pure_dict(state, restored)``); with an ``nnx.State`` template it
returns an ``nnx.State`` directly.

A save writes into a hidden sibling directory (orbax finalises ``arrays/``
atomically inside it), records the size and SHA-256 of every file, then renames
the sibling to ``path``. A save killed midway leaves ``path`` as it was; with
``overwrite=True`` the previous checkpoint is renamed away only once the new one
is complete. A lock file ``.<name>.jaxcomp-lock`` next to ``path`` refuses two
concurrent saves to the same path. Paths are local files (single process).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.core import FrozenDict

import jaxcomp
from jaxcomp.quant import QArray
from jaxcomp.rules import PyTree, path_str
from jaxcomp.sparsity import BitmaskSparse, NMSparse

__all__ = [
    "CheckpointError",
    "disk_bytes",
    "read_metadata",
    "register_node_type",
    "restore",
    "save",
]

_FORMAT = "jaxcomp-checkpoint"
_FORMAT_VERSION = 1
_SIDECAR = "jaxcomp.json"
_ARRAYS = "arrays"
_SCALARS = {bool: "bool", int: "int", float: "float", complex: "complex", str: "str"}
_NODE_TYPES: dict[str, type] = {}
_TMP, _OLD = (r"\.{}\.jaxcomp-tmp-[0-9a-f]{{12}}", r"\.{}\.jaxcomp-old-[0-9a-f]{{12}}")
_DictKey, _SeqKey, _AttrKey = (
    jax.tree_util.DictKey,
    jax.tree_util.SequenceKey,
    jax.tree_util.GetAttrKey,
)


class CheckpointError(ValueError):
    """A checkpoint path that is missing, in use, incomplete or corrupted."""


def register_node_type(cls: type, name: str | None = None) -> type:
    """Lets checkpoints hold instances of a pytree dataclass such as ``QArray``.

    The class must be a dataclass registered with
    ``jax.tree_util.register_dataclass`` (or ``flax.struct.dataclass``). Its data
    fields are saved like any subtree; its other ``__init__`` fields are meta
    values saved in the JSON sidecar (``None``, bool, int, float, str, tuples,
    lists, str-keyed dicts, dtypes). It is rebuilt with ``cls(**data, **meta)``.

    Args:
      cls: the dataclass type.
      name: name recorded in checkpoints; defaults to ``cls.__name__``.

    Returns:
      ``cls`` (so this works as a class decorator).

    Example:
      >>> register_node_type(QArray)
      <class 'jaxcomp.quant._qarray.QArray'>
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_node_type needs a pytree dataclass type; got {cls!r}")
    name = cls.__name__ if name is None else name
    known = _NODE_TYPES.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"node type name {name!r} is already registered for {known!r}")
    _NODE_TYPES[name] = cls
    return cls


register_node_type(QArray)
register_node_type(NMSparse)
register_node_type(BitmaskSparse)


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
    target = _as_path(path)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata is a {type(metadata).__name__}; expected a dict or None")
    arrays: dict[str, Any] = {}
    spec = _encode(tree, (), arrays)
    leaves = {path_str(kp): _leaf_info(s) for kp, s in _walk(spec, (), stop_at_nodes=True)}
    body = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "jaxcomp_version": jaxcomp.__version__,
        "orbax_version": ocp.__version__,
        "metadata": _to_json(metadata or {}, "metadata"),
        "leaves": leaves,
        "nbytes": sum(info["nbytes"] for info in leaves.values()),
        "tree": spec,
    }
    stored = {k: v for k, v in arrays.items() if v.size}
    target.parent.mkdir(parents=True, exist_ok=True)
    with _save_lock(target):
        if os.path.lexists(target):
            if not overwrite:
                raise CheckpointError(
                    f"checkpoint path {target} already exists; pass overwrite=True to replace it"
                )
            if not (target / _SIDECAR).is_file():
                raise CheckpointError(
                    f"{target} exists and is not a jaxcomp checkpoint (no {_SIDECAR}); "
                    "refusing to overwrite it"
                )
        _remove_leftovers(target)
        staging = _sibling(target, "tmp")
        try:
            staging.mkdir()
            if stored:
                with ocp.PyTreeCheckpointer() as ckptr:
                    ckptr.save(staging / _ARRAYS, args=ocp.args.PyTreeSave(stored))
            _write_sidecar(staging, body)
            _swap_in(staging, target)
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
    root = _checkpoint_dir(path)
    doc = _read_sidecar(root)
    _verify_files(root, doc["files"])
    spec = doc["tree"]
    leaf_paths = [path_str(kp) for kp, _ in _walk(spec, ())]
    pick = _sharding_picker(shardings, leaf_paths)
    tleaves, treedef = None, None
    if template is not None:
        _compare(spec, _encode(template, (), None), ())
        flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_none)
        tleaves = {path_str(kp): leaf for kp, leaf in flat}
    targets = {}
    for kp, s in _walk(spec, ()):
        if s["type"] != "array":
            continue
        name = path_str(kp)
        kind, dtype, sharding = s["kind"], jnp.dtype(s["dtype"]), pick(name)
        if tleaves is not None:
            t = tleaves[name]
            kind = "jax" if isinstance(t, jax.Array | jax.ShapeDtypeStruct) else _kind(t)
            dtype = jnp.dtype(t.dtype)
            if sharding is None and kind == "jax":
                sharding = t.sharding
        if sharding is not None:
            kind = "jax"
        targets[s["key"]] = (s, kind, dtype, sharding)
    arrays = _read_arrays(root, targets)
    try:
        tree = _decode(spec, arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild the tree described by {root / _SIDECAR}: {e}") from e
    if treedef is None:
        return tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
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
    doc = _read_sidecar(_checkpoint_dir(path))
    doc["metadata"] = _from_json(doc["metadata"])
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
    root = _checkpoint_dir(path)
    return sum(
        os.stat(os.path.join(d, f), follow_symlinks=False).st_size
        for d, _, files in os.walk(root)
        for f in files
    )


# --- tree <-> JSON spec -------------------------------------------------------------------


def _encode(x: Any, kp: tuple, arrays: dict | None) -> dict:
    """JSON spec of ``x``; array leaves are collected into ``arrays`` (None: a template)."""
    if x is None:
        return {"type": "none"}
    name = _node_name(x)
    if name is not None:
        return _encode_node(x, name, kp, arrays)
    if isinstance(x, nnx.Variable):
        return _encode(x.get_value(), kp, arrays)
    if isinstance(x, nnx.State):
        x = nnx.to_pure_dict(x)
    if isinstance(x, dict | FrozenDict):
        keys = list(x.keys())
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise TypeError(f"dict key {k!r} under '{_where(kp)}' is not a str or int")
        values = [_encode(x[k], (*kp, _DictKey(k)), arrays) for k in keys]
        return {"type": "dict", "keys": keys, "values": values}
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
        values = [_encode(v, (*kp, _AttrKey(f)), arrays) for f, v in zip(x._fields, x, strict=True)]
        return {
            "type": "namedtuple",
            "name": type(x).__name__,
            "fields": list(x._fields),
            "values": values,
        }
    if isinstance(x, list | tuple):
        values = [_encode(v, (*kp, _SeqKey(i)), arrays) for i, v in enumerate(x)]
        return {"type": "list" if isinstance(x, list) else "tuple", "values": values}
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"leaf '{_where(kp)}' is a traced value; call save outside jit")
    if isinstance(x, jax.Array | np.ndarray | np.generic) or (
        arrays is None and isinstance(x, jax.ShapeDtypeStruct)
    ):
        return _encode_array(x, kp, arrays)
    for cls, label in _SCALARS.items():
        if type(x) is cls or (cls is not bool and isinstance(x, cls)):
            return {"type": label, "value": _scalar_to_json(x, label)}
    raise TypeError(
        f"leaf '{_where(kp)}' has type {type(x).__name__}; checkpoints hold dicts, lists, "
        f"tuples, namedtuples, nnx.State, None, arrays, Python scalars and the node types "
        f"{sorted(_NODE_TYPES)} (add others with register_node_type)"
    )


def _encode_array(x: Any, kp: tuple, arrays: dict | None) -> dict:
    dtype = jnp.dtype(x.dtype)
    if dtype.kind in "OUSMm":
        raise TypeError(f"leaf '{_where(kp)}' has dtype {dtype}; expected a numeric or bool dtype")
    spec = {"type": "array", "kind": _kind(x), "dtype": dtype.name, "shape": list(x.shape)}
    if arrays is not None:
        spec["key"] = f"a{len(arrays)}"
        arrays[spec["key"]] = np.asarray(x) if isinstance(x, np.generic) else x
    return spec


def _encode_node(x: Any, name: str, kp: tuple, arrays: dict | None) -> dict:
    children = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
    data = {}
    for child_path, child in children:
        if len(child_path) != 1 or not isinstance(child_path[0], _AttrKey):
            raise TypeError(
                f"node type {name} at '{_where(kp)}' is not a dataclass registered with "
                "jax.tree_util.register_dataclass"
            )
        data[child_path[0].name] = _encode(child, (*kp, child_path[0]), arrays)
    meta = {
        f.name: _to_json(getattr(x, f.name), f"{_where(kp)}.{f.name}")
        for f in dataclasses.fields(x)
        if f.init and f.name not in data
    }
    return {"type": "node", "class": name, "data": data, "meta": meta}


def _decode(spec: dict, arrays: dict) -> Any:
    """Inverse of :func:`_encode`; ``arrays`` maps the spec keys to restored arrays."""
    kind = spec["type"]
    if kind == "none":
        return None
    if kind == "array":
        return arrays[spec["key"]]
    if kind == "node":
        cls = _NODE_TYPES.get(spec["class"])
        if cls is None:
            raise TypeError(f"node type {spec['class']!r} is not registered (register_node_type)")
        data = {k: _decode(v, arrays) for k, v in spec["data"].items()}
        return cls(**data, **{k: _from_json(v) for k, v in spec["meta"].items()})
    values = [_decode(v, arrays) for v in spec.get("values", ())]
    if kind == "dict":
        return dict(zip(spec["keys"], values, strict=True))
    if kind == "list":
        return values
    if kind == "tuple":
        return tuple(values)
    if kind == "namedtuple":
        return collections.namedtuple(spec["name"], spec["fields"])(*values)
    return _scalar_from_json(spec["value"], kind)


def _children(spec: dict) -> list[tuple[Any, dict]]:
    kind = spec["type"]
    if kind == "dict":
        return [(_DictKey(k), v) for k, v in zip(spec["keys"], spec["values"], strict=True)]
    if kind in ("list", "tuple"):
        return [(_SeqKey(i), v) for i, v in enumerate(spec["values"])]
    if kind == "namedtuple":
        return [(_AttrKey(f), v) for f, v in zip(spec["fields"], spec["values"], strict=True)]
    if kind == "node":
        return [(_AttrKey(k), v) for k, v in spec["data"].items()]
    return []


def _walk(spec: dict, kp: tuple, *, stop_at_nodes: bool = False) -> Iterator[tuple[tuple, dict]]:
    """Yields ``(key_path, spec)`` for every leaf (array, scalar, None) of a spec."""
    kind = spec["type"]
    if kind in ("dict", "list", "tuple", "namedtuple") or (kind == "node" and not stop_at_nodes):
        for key, child in _children(spec):
            yield from _walk(child, (*kp, key), stop_at_nodes=stop_at_nodes)
    else:
        yield kp, spec


def _compare(saved: dict, tmpl: dict, kp: tuple) -> None:
    """Raises ValueError naming the first leaf path where the template differs."""

    def fail(at: tuple, what: str):
        raise ValueError(f"template does not match the checkpoint at '{_where(at)}': {what}")

    if saved["type"] != tmpl["type"]:
        fail(kp, f"checkpoint has {_describe(saved)}, template has {_describe(tmpl)}")
    kind = saved["type"]
    if kind == "node" and saved["class"] != tmpl["class"]:
        fail(kp, f"checkpoint has a {saved['class']}, template has a {tmpl['class']}")
    for field in ("name", "fields", "meta", "shape"):
        if saved.get(field) != tmpl.get(field):
            got, want = saved.get(field), tmpl.get(field)
            if field == "meta":
                first = next(
                    f for f in sorted(got.keys() | want.keys()) if got.get(f) != want.get(f)
                )
                field, got, want = first, got.get(first), want.get(first)
            fail(
                kp,
                f"{field} is {_from_json(got)} in the checkpoint, {_from_json(want)} in the "
                "template",
            )
    saved_children, tmpl_children = dict(_children(saved)), dict(_children(tmpl))
    for key in (k for k in saved_children if k not in tmpl_children):
        fail((*kp, key), "present in the checkpoint, missing from the template")
    for key in (k for k in tmpl_children if k not in saved_children):
        fail((*kp, key), "present in the template, missing from the checkpoint")
    for key, child in saved_children.items():
        _compare(child, tmpl_children[key], (*kp, key))


def _describe(spec: dict) -> str:
    kind = spec["type"]
    if kind == "array":
        return f"an array {spec['dtype']}{spec['shape']}"
    if kind == "node":
        return f"a {spec['class']}"
    if kind in ("dict", "list", "tuple", "namedtuple"):
        return f"a {kind} of {len(spec['values'])}"
    return "None" if kind == "none" else f"a Python {kind}"


def _leaf_info(spec: dict) -> dict:
    """Per-leaf format for the sidecar index: dtype, shape, bytes, node meta fields."""
    kind = spec["type"]
    if kind == "array":
        nbytes = math.prod(spec["shape"]) * jnp.dtype(spec["dtype"]).itemsize
        return {"type": "array", "dtype": spec["dtype"], "shape": spec["shape"], "nbytes": nbytes}
    if kind != "node":
        return {"type": kind, "nbytes": 0}
    parts = {path_str(kp): _leaf_info(s) for kp, s in _walk(spec, ())}
    arrays = {name: info for name, info in parts.items() if info["type"] == "array"}
    meta = {k: _untag(v) for k, v in spec["meta"].items()}
    nbytes = sum(info["nbytes"] for info in parts.values())
    return {**meta, "type": spec["class"], "arrays": arrays, "nbytes": nbytes}


def _kind(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    return "numpy_scalar" if isinstance(x, np.generic) else "jax"


def _node_name(x: Any) -> str | None:
    return next((n for n, cls in _NODE_TYPES.items() if type(x) is cls), None)


def _is_none(x: Any) -> bool:
    return x is None


def _where(kp: tuple) -> str:
    return path_str(kp) or "<root>"


# --- JSON values --------------------------------------------------------------------------


def _to_json(value: Any, where: str) -> Any:
    """Plain JSON for meta values and metadata; tuples and dtypes are tagged to round-trip."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; only finite floats can be stored")
        return value
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return _to_json(value.item(), where)
    if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
        return {"__dtype__": jnp.dtype(value).name}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k in ("__tuple__", "__dtype__"):
                raise TypeError(
                    f"{where} has key {k!r}; keys must be str (not __tuple__/__dtype__)"
                )
            out[k] = _to_json(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r}); expected None, bool, int, float, "
        "str, tuple, list, str-keyed dict or a dtype"
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if value.keys() == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if value.keys() == {"__dtype__"}:
            return jnp.dtype(value["__dtype__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _untag(value: Any) -> Any:
    """Tagged JSON to plain JSON (tuples as lists, dtypes as names), for the leaf index."""
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        if value.keys() in ({"__tuple__"}, {"__dtype__"}):
            return _untag(next(iter(value.values())))
        return {k: _untag(v) for k, v in value.items()}
    return value


def _scalar_to_json(x: Any, label: str) -> Any:
    if label == "float":
        return float(x).hex()
    if label == "complex":
        return [x.real.hex(), x.imag.hex()]
    return x


def _scalar_from_json(value: Any, label: str) -> Any:
    if label == "float":
        return float.fromhex(value)
    if label == "complex":
        return complex(float.fromhex(value[0]), float.fromhex(value[1]))
    if label not in _SCALARS.values():
        raise ValueError(f"unknown entry type {label!r}")
    return value


# --- files --------------------------------------------------------------------------------


def _as_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path)).expanduser().absolute()


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    root = _as_path(path)
    if not root.exists():
        old = _OLD.format(re.escape(root.name))
        siblings = os.scandir(root.parent) if root.parent.is_dir() else ()
        left = [e.path for e in siblings if re.fullmatch(old, e.name)]
        hint = f"; an interrupted save left the previous one at {left[0]}" if left else ""
        raise CheckpointError(f"no checkpoint at {root}: the path does not exist{hint}")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a checkpoint directory")
    return root


def _digest(body: dict) -> str:
    text = json.dumps(
        body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_sidecar(staging: Path, body: dict) -> None:
    files = {}
    for f in sorted(staging.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            files[f.relative_to(staging).as_posix()] = {"bytes": f.stat().st_size, "sha256": digest}
    body = {**body, "files": files}
    text = json.dumps(
        {**body, "sha256": _digest(body)},
        sort_keys=True,
        ensure_ascii=False,
        indent=1,
        allow_nan=False,
    )
    with open(staging / _SIDECAR, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _read_sidecar(root: Path) -> dict:
    f = root / _SIDECAR
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        ok = isinstance(doc, dict) and doc.pop("sha256", None) == _digest(doc)
    except FileNotFoundError:
        raise CheckpointError(f"{root} is not a jaxcomp checkpoint: {f} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint sidecar {f} is corrupted: {e}") from None
    if not ok:
        raise CheckpointError(f"checkpoint sidecar {f} is corrupted: its checksum does not match")
    if doc.get("format") != _FORMAT or doc.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{f} has format {doc.get('format')!r} version {doc.get('format_version')!r}; "
            f"this jaxcomp reads {_FORMAT!r} version {_FORMAT_VERSION}"
        )
    return doc


def _verify_files(root: Path, files: dict) -> None:
    for rel, info in files.items():
        f = root / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {root} is incomplete: {f} is missing") from None
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or modified: {size} bytes, "
                f"expected {info['bytes']}"
            )
        with open(f, "rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != info["sha256"]:
                raise CheckpointError(f"checkpoint file {f} is corrupted: SHA-256 mismatch")


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
            raise TypeError(f"shardings entry '{_where(kp)}' is {s!r}; expected a Sharding or None")
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
                read = ckptr.restore(root / _ARRAYS, args=ocp.args.PyTreeRestore(restore_args=args))
        except Exception as e:
            raise CheckpointError(f"cannot read the arrays in {root / _ARRAYS}: {e}") from e
        for key in args:
            spec, kind, dtype, _ = targets[key]
            value = read.get(key) if isinstance(read, dict) else None
            if value is None or tuple(value.shape) != tuple(spec["shape"]):
                raise CheckpointError(f"{root / _ARRAYS} does not hold array {key} as recorded")
            out[key] = value if kind == "jax" else np.asarray(value).astype(dtype, copy=False)
    return {k: v[()] if targets[k][1] == "numpy_scalar" else v for k, v in out.items()}


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.jaxcomp-{tag}-{uuid.uuid4().hex[:12]}"


def _remove_leftovers(target: Path) -> None:
    """Deletes staging dirs of killed saves (and old copies once ``target`` exists)."""
    patterns = [_TMP, _OLD] if target.exists() else [_TMP]
    name = re.escape(target.name)
    for entry in os.scandir(target.parent):
        if any(re.fullmatch(p.format(name), entry.name) for p in patterns):
            shutil.rmtree(entry.path, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
        os.rename(staging, target)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old)
    else:
        os.rename(staging, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _save_lock(target: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``.<name>.jaxcomp-lock``; released when the process dies."""
    lock = target.parent / f".{target.name}.jaxcomp-lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"another save to {target} is in progress (lock file {lock} is held)"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a jaxcomp checkpoint (its ``jaxcomp.json``)."""
    return (Path(path) / _SIDECAR).is_file()
