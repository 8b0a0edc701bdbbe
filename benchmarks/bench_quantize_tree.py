"""quantize_tree throughput on a ~100M-parameter tree, and its bytes (.nbytes and live memory)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from benchmarks._harness import row
from jaxcomp import quant
from jaxcomp.rules import tree_nbytes


def _live_bytes() -> tuple[int, str]:
    """Device memory in use: ``memory_stats()`` where the backend reports it, else live arrays."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"]), "memory_stats"
    return sum(a.nbytes for a in jax.live_arrays()), "live_arrays"


def _tree(layers: int, dim: int) -> dict:
    keys = jax.random.split(jax.random.key(0), layers)
    return {
        f"layer_{i}": {"kernel": jax.random.normal(k, (dim, dim), jnp.float32) / dim**0.5}
        for i, k in enumerate(keys)
    }


def run(*, quick: bool = False) -> list[dict]:
    layers, dim = (10, 1024) if quick else (24, 2048)  # 10.5M or 100.7M parameters
    config = quant.QuantConfig(bits=4, group_size=128)
    before, how = _live_bytes()
    params = jax.block_until_ready(_tree(layers, dim))
    float_live = _live_bytes()[0] - before
    jax.block_until_ready(quant.quantize_tree(params, default=config))  # compile
    times = []
    for _ in range(1 if quick else 3):
        start = time.perf_counter()
        qparams = jax.block_until_ready(quant.quantize_tree(params, default=config))
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    float_bytes = tree_nbytes(params)
    q_bytes = tree_nbytes(qparams)
    del params
    q_live = _live_bytes()[0] - before
    n = layers * dim * dim
    return [
        row(
            "quantize_tree",
            f"int4 g128, {n / 1e6:.1f}M params: {float_bytes / seconds / 1e9:.2f} GB/s; "
            f"bytes {q_bytes / float_bytes:.3f}x (.nbytes), {q_live / float_live:.3f}x (live)",
            seconds,
            seconds,
            gb_per_s=float_bytes / seconds / 1e9,
            nbytes_ratio=q_bytes / float_bytes,
            live_ratio=q_live / float_live,
            live_measure=how,
            target="nbytes and live <= 0.14x",
            passed=q_bytes / float_bytes <= 0.14 and q_live / float_live <= 0.14,
        )
    ]
