"""GPTQ of one kernel (given its Hessian) against one float32 matmul of the same size.

Target (issue): GPTQ on a 4096x4096 kernel at group size 128 takes at most 4x
the time of one 4096x4096x4096 float32 matmul in the same process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks._harness import interleaved, row
from jaxcomp import ptq


def _case(dim: int, group_size: int, repeats: int, *, target: float | None) -> dict:
    x = jax.random.normal(jax.random.key(0), (2 * dim, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    hessian = jax.block_until_ready(jax.jit(lambda x: 2.0 * x.T @ x / x.shape[0])(x))
    matmul = jax.jit(lambda a, b: a @ b)
    t_ours, t_base = interleaved(
        lambda: ptq.gptq(w, hessian, bits=4, group_size=group_size),
        lambda: matmul(w, w),
        warmup=1,
        repeats=repeats,
    )
    ratio = t_ours / t_base
    return row(
        "gptq",
        f"gptq {dim}x{dim} 4-bit g{group_size} vs {dim}^3 f32 matmul",
        t_ours,
        t_base,
        target="" if target is None else f"<= {target:g}x",
        passed=None if target is None else ratio <= target,
    )


def run(*, quick: bool = False) -> list[dict]:
    if quick:
        return [_case(1024, 128, 3, target=None)]
    return [_case(4096, 128, 5, target=4.0)]
