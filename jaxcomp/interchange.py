"""Safetensors interchange: Hugging Face-style weights in, compressed-tensors weights out.

**Reading** (:func:`load_safetensors`): PyTorch-layout names ``a.b.weight`` become the
Flax path ``a/b/kernel`` with 2-D weights transposed from ``[out, in]`` to
``[in, out]``; 2-D weights whose name contains ``embed`` become ``embedding``
(not transposed); 1-D ``weight`` becomes a norm ``scale``.

**Writing** (:func:`save_compressed_tensors`) follows the compressed-tensors
``pack-quantized`` layout (as read by vLLM and llm-compressor) for every
symmetric integer :class:`~jaxcomp.quant.QArray` kernel ``[in, out]`` with one
scale per output channel or per group of inputs, at 2, 4 or 8 bits:

=========================  =======  ===============================================
tensor                     dtype    content
=========================  =======  ===============================================
``NAME.weight_packed``     int32    ``[out, ceil(in * bits / 32)]``: codes ``q`` offset
                                    to ``q + 2^(bits-1)``, ``32 / bits`` per int32 along
                                    the input axis, element ``j`` of a word in bits
                                    ``[j * bits, (j + 1) * bits)``
``NAME.weight_scale``      float32  ``[out, in / group_size]`` (``[out, 1]`` per channel)
``NAME.weight_shape``      int64    ``[out, in]``
=========================  =======  ===============================================

Dequantization is ``w[o, i] = q[o, i] * scale[o, i // group_size]``. Other leaves are
stored as plain tensors (kernels transposed to ``weight``). The file's metadata holds
``quantization_config`` (``config_groups`` with ``num_bits``, ``strategy``,
``group_size``, ``symmetric``, ``targets``) and the original dtypes, so
:func:`load_compressed_tensors` rebuilds the exact QArrays.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from jaxcomp.quant import QArray
from jaxcomp.rules import PyTree, path_str

_PACK_BITS = (2, 4, 8)


def _require_safetensors():
    try:
        from safetensors import numpy as st_numpy
    except ImportError as e:
        raise ImportError("reading safetensors needs `pip install safetensors`") from e
    return st_numpy


def _flax_name(torch_name: str, ndim: int) -> list[str]:
    parts = torch_name.split(".")
    if parts[-1] == "weight":
        if ndim == 2:
            parts[-1] = "embedding" if "embed" in torch_name.lower() else "kernel"
        elif ndim == 1:
            parts[-1] = "scale"
    return parts


def load_safetensors(path: str | os.PathLike, *, transpose: bool = True) -> PyTree:
    """Reads a safetensors file into a nested dict in Flax layout (see module docstring).

    Args:
      path: a ``.safetensors`` file.
      transpose: transpose 2-D ``weight`` tensors of linear layers to ``[in, out]``.

    Returns:
      Nested dicts of numpy arrays, e.g. ``tree["encoder"]["layer"]["0"]["query"]["kernel"]``.
    """
    tensors = _require_safetensors().load_file(os.fspath(path))
    tree: dict[str, Any] = {}
    for name, value in tensors.items():
        parts = _flax_name(name, value.ndim)
        if parts[-1] == "kernel" and transpose:
            value = np.ascontiguousarray(value.T)
        node = tree
        for key in parts[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"safetensors name {name!r} clashes with a tensor at {key!r}")
        node[parts[-1]] = value
    return tree


def pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """Packs signed codes ``[rows, cols]`` into int32 words along ``cols`` (offset encoding).

    >>> word = pack_int32(np.array([[-8, 7, 0, 1, 0, 0, 0, 0]]), 4)[0, 0]
    >>> hex(int(word.view(np.uint32)))  # offset codes 0, 15, 8, 9, 8, ... from the low bits
    '0x888898f0'
    """
    per_word = 32 // bits
    rows, cols = q.shape
    unsigned = (q.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
    pad = -cols % per_word
    unsigned = np.pad(unsigned, ((0, 0), (0, pad)))
    words = unsigned.reshape(rows, -1, per_word) << (np.arange(per_word, dtype=np.uint32) * bits)
    return np.ascontiguousarray(np.bitwise_or.reduce(words, axis=-1)).view(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_int32`: int32 words to signed int8 codes ``[rows, cols]``."""
    per_word = 32 // bits
    words = packed.view(np.uint32)[..., None] >> (np.arange(per_word, dtype=np.uint32) * bits)
    unsigned = (words & ((1 << bits) - 1)).reshape(packed.shape[0], -1)[:, :cols]
    return (unsigned.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def _torch_name(path: str) -> str:
    parts = path.split("/")
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _check_exportable(name: str, q: QArray) -> None:
    ok = (
        q.fmt == "int"
        and q.zero_point is None
        and q.bits in _PACK_BITS
        and len(q.shape) == 2
        and q.channel_axis == 1
    )
    if not ok:
        zero = "set" if q.zero_point is not None else "none"
        raise ValueError(
            f"{name}: a QArray with fmt={q.fmt!r}, bits={q.bits}, shape={q.shape}, "
            f"channel_axis={q.channel_axis}, zero point {zero}"
            f" cannot be written as pack-quantized; expected a symmetric int kernel [in, out] "
            f"with bits in {_PACK_BITS} and scales per output channel or group"
        )


def save_compressed_tensors(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes a params tree holding QArray kernels as a compressed-tensors safetensors file."""
    st_numpy = _require_safetensors()
    tensors: dict[str, np.ndarray] = {}
    groups: dict[tuple, list[str]] = {}
    dtypes: dict[str, str] = {}
    is_leaf = lambda x: x is None or isinstance(x, QArray)  # noqa: E731
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        if leaf is None:
            continue
        name = path_str(key_path)
        if isinstance(leaf, QArray):
            _check_exportable(name, leaf)
            module = _torch_name(name).removesuffix(".weight")
            codes = np.asarray(leaf.grid_values()).astype(np.int8)  # [in, out]
            tensors[f"{module}.weight_packed"] = pack_int32(codes.T, leaf.bits)
            tensors[f"{module}.weight_scale"] = np.ascontiguousarray(np.asarray(leaf.scale).T)
            tensors[f"{module}.weight_shape"] = np.array(leaf.shape[::-1], np.int64)
            groups.setdefault((leaf.bits, leaf.group_size), []).append(module)
            dtypes[module] = leaf.dtype
        else:
            value = np.asarray(leaf)
            if name.endswith("kernel") and value.ndim == 2:
                value = value.T
            tensors[_torch_name(name)] = np.ascontiguousarray(value)
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            f"group_{i}": {
                "targets": modules,
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group" if group else "channel",
                    "group_size": group,
                },
            }
            for i, ((bits, group), modules) in enumerate(sorted(groups.items(), key=str))
        },
    }
    metadata = {
        "format": "pt",
        "quantization_config": json.dumps(config),
        "jaxcomp_dtypes": json.dumps(dtypes),
    }
    # safetensors writes the raw buffer: every tensor must be C-contiguous
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    st_numpy.save_file(tensors, os.fspath(path), metadata=metadata)


def load_compressed_tensors(path: str | os.PathLike) -> PyTree:
    """Reads a file written by :func:`save_compressed_tensors` back into QArrays, exactly."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "quantization_config" not in meta:
        raise ValueError(f"{os.fspath(path)!r} has no quantization_config metadata")
    config = json.loads(meta["quantization_config"])
    dtypes = json.loads(meta.get("jaxcomp_dtypes", "{}"))
    layer: dict[str, tuple[int, int | None]] = {}
    for group in config["config_groups"].values():
        weights = group["weights"]
        for module in group["targets"]:
            layer[module] = (weights["num_bits"], weights["group_size"])
    flat: dict[str, Any] = {}
    for module, (bits, group_size) in layer.items():
        out_dim, in_dim = (int(v) for v in tensors.pop(f"{module}.weight_shape"))
        codes = unpack_int32(tensors.pop(f"{module}.weight_packed"), bits, in_dim)
        scale = tensors.pop(f"{module}.weight_scale")
        flat[f"{module}.weight"] = QArray.from_grid(
            codes.T,
            scale.T,
            bits=bits,
            shape=(in_dim, out_dim),
            dtype=dtypes.get(module, "float32"),
            channel_axis=1,
            group_size=group_size,
        )
    for name, value in tensors.items():
        is_kernel = name.endswith(".weight") and value.ndim == 2
        flat[name] = np.ascontiguousarray(value.T) if is_kernel else value
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        if parts[-1] == "weight":
            parts[-1] = "kernel"
        node = tree
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    return tree
