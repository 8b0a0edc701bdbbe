"""An int8 per-channel Dense forward through ``weight_only_dot_general`` against float32.

Up to 32 tokens the native AVX-512 kernel runs where the CPU has it; past that,
XLA dequantizes the weight inside ``jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks._harness import interleaved, row
from jaxcomp import quant


def _case(tokens: int, dim: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    q = quant.quantize(w, bits=8)
    dense = jax.jit(lambda x, w: x @ w)
    dense_q = jax.jit(lambda x, q: quant.weight_only_dot_general(x, q, (((1,), (0,)), ((), ()))))
    t_ours, t_base = interleaved(lambda: dense_q(x, q), lambda: dense(x, w), repeats=repeats)
    return row(
        "int8_dense",
        f"weight-only int8 [{tokens}x{dim}]@[{dim}x{dim}]",
        t_ours,
        t_base,
        weight_bytes_ratio=q.nbytes / w.nbytes,
    )


def run(*, quick: bool = False) -> list[dict]:
    sizes = [(16, 1024)] if quick else [(1, 4096), (256, 4096)]
    return [_case(tokens, dim, 5 if quick else 15) for tokens, dim in sizes]
