"""Checkpoint tree specs: the JSON description of a jaxcomp tree, and node types.

Containers (dicts, lists, tuples, namedtuples), ``None`` leaves, Python scalars
and the dataclass node types of a small registry (``QArray``, ``NMSparse``,
``BitmaskSparse``, extensible with :func:`register_node_type`) are described in
JSON; array leaves are collected for orbax under keys ``a0, a1, ...``. Node
entries hold their array children and their static meta fields. Nothing is
pickled.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from jaxcomp.quant import QArray
from jaxcomp.rules import path_str
from jaxcomp.sparsity import BitmaskSparse, NMSparse

_SCALARS = {bool: "bool", int: "int", float: "float", complex: "complex", str: "str"}
NODE_TYPES: dict[str, type] = {}
_DictKey, _SeqKey, _AttrKey = (
    jax.tree_util.DictKey,
    jax.tree_util.SequenceKey,
    jax.tree_util.GetAttrKey,
)


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
    known = NODE_TYPES.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"node type name {name!r} is already registered for {known!r}")
    NODE_TYPES[name] = cls
    return cls


def encode(x: Any, kp: tuple, arrays: dict | None) -> dict:
    """JSON spec of ``x``; array leaves are collected into ``arrays`` (None: a template)."""
    if x is None:
        return {"type": "none"}
    name = _node_name(x)
    if name is not None:
        return _encode_node(x, name, kp, arrays)
    if isinstance(x, nnx.Variable):
        return encode(x.get_value(), kp, arrays)
    if isinstance(x, nnx.State):
        x = nnx.to_pure_dict(x)
    if isinstance(x, dict | FrozenDict):
        keys = list(x.keys())
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise TypeError(f"dict key {k!r} under '{where(kp)}' is not a str or int")
        values = [encode(x[k], (*kp, _DictKey(k)), arrays) for k in keys]
        return {"type": "dict", "keys": keys, "values": values}
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
        values = [encode(v, (*kp, _AttrKey(f)), arrays) for f, v in zip(x._fields, x, strict=True)]
        return {
            "type": "namedtuple",
            "name": type(x).__name__,
            "fields": list(x._fields),
            "values": values,
        }
    if isinstance(x, list | tuple):
        values = [encode(v, (*kp, _SeqKey(i)), arrays) for i, v in enumerate(x)]
        return {"type": "list" if isinstance(x, list) else "tuple", "values": values}
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"leaf '{where(kp)}' is a traced value; call save outside jit")
    if isinstance(x, jax.Array | np.ndarray | np.generic) or (
        arrays is None and isinstance(x, jax.ShapeDtypeStruct)
    ):
        return _encode_array(x, kp, arrays)
    for cls, label in _SCALARS.items():
        if type(x) is cls or (cls is not bool and isinstance(x, cls)):
            return {"type": label, "value": _scalar_to_json(x, label)}
    raise TypeError(
        f"leaf '{where(kp)}' has type {type(x).__name__}; checkpoints hold dicts, lists, "
        f"tuples, namedtuples, nnx.State, None, arrays, Python scalars and the node types "
        f"{sorted(NODE_TYPES)} (add others with register_node_type)"
    )


def _encode_array(x: Any, kp: tuple, arrays: dict | None) -> dict:
    dtype = jnp.dtype(x.dtype)
    if dtype.kind in "OUSMm":
        raise TypeError(f"leaf '{where(kp)}' has dtype {dtype}; expected a numeric or bool dtype")
    spec = {"type": "array", "kind": kind(x), "dtype": dtype.name, "shape": list(x.shape)}
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
                f"node type {name} at '{where(kp)}' is not a dataclass registered with "
                "jax.tree_util.register_dataclass"
            )
        data[child_path[0].name] = encode(child, (*kp, child_path[0]), arrays)
    meta = {
        f.name: to_json(getattr(x, f.name), f"{where(kp)}.{f.name}")
        for f in dataclasses.fields(x)
        if f.init and f.name not in data
    }
    return {"type": "node", "class": name, "data": data, "meta": meta}


def decode(spec: dict, arrays: dict) -> Any:
    """Inverse of :func:`encode`; ``arrays`` maps the spec keys to restored arrays."""
    kind = spec["type"]
    if kind == "none":
        return None
    if kind == "array":
        return arrays[spec["key"]]
    if kind == "node":
        cls = NODE_TYPES.get(spec["class"])
        if cls is None:
            raise TypeError(f"node type {spec['class']!r} is not registered (register_node_type)")
        data = {k: decode(v, arrays) for k, v in spec["data"].items()}
        return cls(**data, **{k: from_json(v) for k, v in spec["meta"].items()})
    values = [decode(v, arrays) for v in spec.get("values", ())]
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


def walk(spec: dict, kp: tuple, *, stop_at_nodes: bool = False) -> Iterator[tuple[tuple, dict]]:
    """Yields ``(key_path, spec)`` for every leaf (array, scalar, None) of a spec."""
    kind = spec["type"]
    if kind in ("dict", "list", "tuple", "namedtuple") or (kind == "node" and not stop_at_nodes):
        for key, child in _children(spec):
            yield from walk(child, (*kp, key), stop_at_nodes=stop_at_nodes)
    else:
        yield kp, spec


def compare(saved: dict, tmpl: dict, kp: tuple) -> None:
    """Raises ValueError naming the first leaf path where the template differs."""

    def fail(at: tuple, what: str):
        raise ValueError(f"template does not match the checkpoint at '{where(at)}': {what}")

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
                f"{field} is {from_json(got)} in the checkpoint, {from_json(want)} in the template",
            )
    saved_children, tmpl_children = dict(_children(saved)), dict(_children(tmpl))
    for key in (k for k in saved_children if k not in tmpl_children):
        fail((*kp, key), "present in the checkpoint, missing from the template")
    for key in (k for k in tmpl_children if k not in saved_children):
        fail((*kp, key), "present in the template, missing from the checkpoint")
    for key, child in saved_children.items():
        compare(child, tmpl_children[key], (*kp, key))


def _describe(spec: dict) -> str:
    kind = spec["type"]
    if kind == "array":
        return f"an array {spec['dtype']}{spec['shape']}"
    if kind == "node":
        return f"a {spec['class']}"
    if kind in ("dict", "list", "tuple", "namedtuple"):
        return f"a {kind} of {len(spec['values'])}"
    return "None" if kind == "none" else f"a Python {kind}"


def leaf_info(spec: dict) -> dict:
    """Per-leaf format for the sidecar index: dtype, shape, bytes, node meta fields."""
    kind = spec["type"]
    if kind == "array":
        nbytes = math.prod(spec["shape"]) * jnp.dtype(spec["dtype"]).itemsize
        return {"type": "array", "dtype": spec["dtype"], "shape": spec["shape"], "nbytes": nbytes}
    if kind != "node":
        return {"type": kind, "nbytes": 0}
    parts = {path_str(kp): leaf_info(s) for kp, s in walk(spec, ())}
    arrays = {name: info for name, info in parts.items() if info["type"] == "array"}
    meta = {k: _untag(v) for k, v in spec["meta"].items()}
    nbytes = sum(info["nbytes"] for info in parts.values())
    return {**meta, "type": spec["class"], "arrays": arrays, "nbytes": nbytes}


def kind(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    return "numpy_scalar" if isinstance(x, np.generic) else "jax"


def _node_name(x: Any) -> str | None:
    return next((n for n, cls in NODE_TYPES.items() if type(x) is cls), None)


def is_none(x: Any) -> bool:
    return x is None


def where(kp: tuple) -> str:
    return path_str(kp) or "<root>"


def to_json(value: Any, where: str) -> Any:
    """Plain JSON for meta values and metadata; tuples and dtypes are tagged to round-trip."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; only finite floats can be stored")
        return value
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return to_json(value.item(), where)
    if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
        return {"__dtype__": jnp.dtype(value).name}
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k in ("__tuple__", "__dtype__"):
                raise TypeError(
                    f"{where} has key {k!r}; keys must be str (not __tuple__/__dtype__)"
                )
            out[k] = to_json(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__} ({value!r}); expected None, bool, int, float, "
        "str, tuple, list, str-keyed dict or a dtype"
    )


def from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if value.keys() == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        if value.keys() == {"__dtype__"}:
            return jnp.dtype(value["__dtype__"])
        return {k: from_json(v) for k, v in value.items()}
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


register_node_type(QArray)
register_node_type(NMSparse)
register_node_type(BitmaskSparse)
