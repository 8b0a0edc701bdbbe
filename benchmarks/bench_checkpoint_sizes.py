"""Checkpoint sizes on disk against float32, and save/restore throughput, on a ~100M-param tree.

Targets (on disk, against the float32 checkpoint of the same tree): int8 per channel
<= 0.27x, int4 group-128 <= 0.15x, 2:4 packed <= 0.60x. Sizes are measured files
(:func:`jaxcomp.checkpoint.disk_bytes`); throughput is float32-equivalent gigabytes
per second of wall time. Rows that report sizes put megabytes in the time columns.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxcomp import checkpoint, quant, sparsity

TARGETS = {"int8 per channel": 0.27, "int4 group 128": 0.15, "2:4 packed": 0.60}


def _tree(layers: int, dim: int) -> dict:
    keys = jax.random.split(jax.random.key(0), layers)
    return {
        f"layer_{i}": {
            "kernel": jax.random.normal(k, (dim, dim), jnp.float32) / dim**0.5,
            "bias": jnp.zeros((dim,), jnp.float32),
        }
        for i, k in enumerate(keys)
    }


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def run(*, quick: bool = False) -> list[dict]:
    layers, dim = (4, 512) if quick else (24, 2048)  # 1.05M or 100.7M parameters
    params = _tree(layers, dim)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    fp32_gb = 4 * n_params / 1e9
    variants = {
        "float32": lambda: params,
        "int8 per channel": lambda: quant.quantize_tree(params),
        "int4 group 128": lambda: quant.quantize_tree(
            params, default=quant.QuantConfig(bits=4, group_size=128)
        ),
        "2:4 packed": lambda: sparsity.compress_tree(
            params, sparsity.compute_masks(params, pattern="2:4"), format="2:4"
        ),
    }
    rows, sizes = [], {}
    root = Path(tempfile.mkdtemp(prefix="jaxcomp-bench-ckpt-"))
    try:
        for name, build in variants.items():
            tree, _ = _timed(build)
            path = root / name.replace(" ", "_").replace(":", "-")
            _, t_save = _timed(lambda path=path, tree=tree: checkpoint.save(path, tree))
            _, t_restore = _timed(lambda path=path: checkpoint.restore(path))
            sizes[name] = checkpoint.disk_bytes(path)
            rows.append(
                {
                    "benchmark": "checkpoint_sizes",
                    "case": f"{name}: save vs restore ({n_params / 1e6:.1f}M params; met = GB/s)",
                    "ours_ms": 1e3 * t_save,
                    "baseline_ms": 1e3 * t_restore,
                    "ratio": t_save / t_restore,
                    "target": "",
                    "met": f"{fp32_gb / t_save:.2f} / {fp32_gb / t_restore:.2f} GB/s",
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, target in TARGETS.items():
        ratio = sizes[name] / sizes["float32"]
        rows.append(
            {
                "benchmark": "checkpoint_sizes",
                "case": f"{name}: disk MB vs float32 MB",
                "ours_ms": sizes[name] / 1e6,
                "baseline_ms": sizes["float32"] / 1e6,
                "ratio": ratio,
                "target": f"<= {target}x",
                "met": "yes" if ratio <= target else "NO",
            }
        )
    return rows
