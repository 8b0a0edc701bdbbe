"""Weight-only int4 group-128 Dense forward (dequantized inside jit) against float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks._harness import interleaved, row
from jaxcomp import quant

DIMS = (((1,), (0,)), ((), ()))


def _case(tokens: int, dim: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    q = quant.quantize(w, bits=4, group_size=128)
    dense = jax.jit(lambda x, w: x @ w)
    ours = jax.jit(lambda x, q: quant.weight_only_dot_general(x, q, DIMS))
    t_ours, t_base = interleaved(lambda: ours(x, q), lambda: dense(x, w), repeats=repeats)
    bytes_ratio = q.nbytes / w.nbytes
    return row(
        "weight_only",
        f"int4 g128 [{tokens}x{dim}]@[{dim}x{dim}]",
        t_ours,
        t_base,
        target="ratio <= 1.0, bytes <= 0.14",
        passed=t_ours <= t_base and bytes_ratio <= 0.14,
        weight_bytes_ratio=bytes_ratio,
    )


def run(*, quick: bool = False) -> list[dict]:
    if quick:
        return [_case(1, 1024, 5)]
    return [_case(tokens, 4096, 11) for tokens in (1, 8)]
