"""Convert existing checkpoints without model code: quantize or prune an orbax params tree.

The input is either a jaxcomp checkpoint or any orbax PyTree checkpoint folder (as
written by ``orbax.checkpoint.StandardCheckpointer`` / ``PyTreeCheckpointer``, or one
item folder of a ``CheckpointManager`` step). The output is a jaxcomp checkpoint
(:mod:`jaxcomp.checkpoint`) whose metadata records the conversion and its rules.

Quantization specs (``--rule REGEX=SPEC`` on the command line):

======================  ===============================================
``int8``                int8, one scale per output channel
``int4:g128``           int4, groups of 128 inputs (any of 2-8 bits)
``int4:g128:asym``      the same with a zero point (asymmetric)
``int8:mse``            calibration ``absmax`` (default), ``percentile``, ``mse``
``fp8_e4m3``, ``nf4``   the float formats of :class:`jaxcomp.quant.QuantConfig`
``none``                leave the matching leaves alone
======================  ===============================================
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcomp import checkpoint, quant, sparsity
from jaxcomp.rules import PyTree, path_str, resolve_configs

_CALIBRATIONS = ("absmax", "minmax", "percentile", "mse")
_FLOAT_FORMATS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "nf4": 4}


def parse_quant_spec(spec: str, *, calibration: str = "absmax") -> quant.QuantConfig | None:
    """Parses ``"int4:g128:asym"``-style specs into a :class:`QuantConfig` (``"none"`` -> None).

    >>> config = parse_quant_spec("int4:g128:asym")
    >>> config.bits, config.group_size, config.symmetric
    (4, 128, False)
    """
    parts = spec.strip().lower().split(":")
    head, options = parts[0], parts[1:]
    if head == "none":
        if options:
            raise ValueError(f"quantization spec {spec!r}: 'none' takes no options")
        return None
    kwargs: dict[str, Any] = {"calibration": calibration}
    if head in _FLOAT_FORMATS:
        kwargs.update(fmt=head, bits=_FLOAT_FORMATS[head])
    elif (m := re.fullmatch(r"int([0-9]+)", head)) is not None:
        kwargs["bits"] = int(m.group(1))
    else:
        raise ValueError(
            f"quantization spec {spec!r} starts with {head!r}; expected int2..int8, "
            f"{', '.join(_FLOAT_FORMATS)} or none"
        )
    for option in options:
        if (m := re.fullmatch(r"g([0-9]+)", option)) is not None:
            kwargs["group_size"] = int(m.group(1))
        elif option in ("asym", "sym"):
            kwargs["symmetric"] = option == "sym"
        elif option in _CALIBRATIONS:
            kwargs["calibration"] = option
        elif option == "tensor":
            kwargs["channel_axis"] = None
        else:
            raise ValueError(
                f"quantization spec {spec!r} has an unknown option {option!r}; expected gN "
                f"(group size), sym, asym, tensor or one of {', '.join(_CALIBRATIONS)}"
            )
    try:
        return quant.QuantConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"quantization spec {spec!r}: {e}") from None


def parse_rules(
    rules: Sequence[str], *, calibration: str = "absmax"
) -> list[tuple[str, quant.QuantConfig | None]]:
    """Parses ``["REGEX=SPEC", ...]`` into a rule list for :func:`jaxcomp.quant.quantize_tree`."""
    parsed = []
    for rule in rules:
        pattern, sep, spec = rule.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"rule {rule!r} is not of the form REGEX=SPEC (e.g. 'head=none')")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule {rule!r} has an invalid regex: {e}") from None
        parsed.append((pattern, parse_quant_spec(spec, calibration=calibration)))
    return parsed


def load_params(path: str | os.PathLike) -> PyTree:
    """Reads a params tree from a jaxcomp checkpoint or a plain orbax PyTree checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: not an existing folder")
    if checkpoint.is_checkpoint(path):
        return checkpoint.restore(path)
    import orbax.checkpoint as ocp

    try:
        tree = ocp.StandardCheckpointer().restore(path.absolute())
    except Exception as e:  # orbax raises many types for a folder that is not a checkpoint
        raise checkpoint.CheckpointError(
            f"{str(path)!r} is not a readable orbax or jaxcomp checkpoint: {e}"
        ) from e
    return jax.device_get(tree)


def _leaves_with_progress(tree, configs, fn, desc: str) -> PyTree:
    is_leaf = lambda x: x is None or isinstance(x, quant.QArray)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    flat_configs = treedef.flatten_up_to(configs)
    out = []
    for (path, leaf), config in tqdm(
        list(zip(flat, flat_configs, strict=True)),
        desc=desc,
        unit="leaf",
        file=sys.stderr,
        disable=None,
    ):
        out.append(leaf if config is None else fn(path_str(path), leaf, config))
    return jax.tree_util.tree_unflatten(treedef, out)


def quantize_params(
    params: PyTree, rules=None, *, default: quant.QuantConfig | None = None, desc="quantize"
) -> PyTree:
    """Quantizes the leaves chosen by ``rules``/``default``, one leaf at a time with progress."""
    configs = resolve_configs(params, rules, default, is_leaf=lambda x: x is None)

    def one(name, leaf, config):
        if isinstance(leaf, quant.QArray):
            return leaf
        if not np.all(np.isfinite(np.asarray(leaf, np.float32))):
            raise ValueError(f"{name}: the tensor holds NaN or Inf; leave it out with {name}=none")
        try:
            return quant.quantize(leaf, **vars(config))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None

    return _leaves_with_progress(params, configs, one, desc)


def prune_params(
    params: PyTree, *, sparsity_level: float | None, pattern: str = "unstructured", rules=None
) -> tuple[PyTree, PyTree]:
    """Magnitude-prunes the default targets (kernels) per layer; returns ``(params, masks)``."""
    masks = sparsity.compute_masks(
        jax.tree.map(np.asarray, params), sparsity=sparsity_level, pattern=pattern, rules=rules
    )
    return sparsity.apply_masks(params, masks), masks


def convert_checkpoint(src, dst, tree: PyTree, *, metadata: dict, overwrite: bool) -> dict:
    """Saves ``tree`` at ``dst`` and returns sizes of both checkpoints on disk."""
    checkpoint.save(dst, tree, metadata=metadata, overwrite=overwrite)
    before, after = checkpoint.disk_bytes(src), checkpoint.disk_bytes(dst)
    return {"source_bytes": before, "output_bytes": after, "ratio": after / max(before, 1)}
