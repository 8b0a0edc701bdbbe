"""Weight-only int4 group-128 Dense forward (dequantized inside jit) against float32.

On a CPU with AVX-512 the native kernel runs for up to 32 tokens
(jaxcomp/quant/kernels/lowbit_matmul.cc); the rows marked "XLA" show XLA's own
lowering of the same function, side by side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks._harness import compiled_without_native, interleaved, row
from jaxcomp import quant
from jaxcomp.quant import _native

DIMS = (((1,), (0,)), ((), ()))


def _case(tokens: int, dim: int, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    q = quant.quantize(w, bits=4, group_size=128)
    dense = jax.jit(lambda x, w: x @ w)
    ours = jax.jit(lambda x, q: quant.weight_only_dot_general(x, q, DIMS))
    t_ours, t_base = interleaved(lambda: ours(x, q), lambda: dense(x, w), repeats=repeats)
    bytes_ratio = q.nbytes / w.nbytes
    native = _native.native_status().lowbit and tokens <= 32
    shape = f"[{tokens}x{dim}]@[{dim}x{dim}]"
    xla = compiled_without_native(lambda x, q: quant.weight_only_dot_general(x, q, DIMS), x, q)
    t_xla, t_base_xla = interleaved(lambda: xla(x, q), lambda: dense(x, w), repeats=repeats)
    return [
        row(
            "weight_only",
            f"int4 g128 {shape} ({'AVX-512 kernel' if native else 'XLA'})",
            t_ours,
            t_base,
            target="ratio <= 1.0, bytes <= 0.14",
            passed=t_ours <= t_base and bytes_ratio <= 0.14,
            weight_bytes_ratio=bytes_ratio,
        ),
        row("weight_only", f"int4 g128 {shape} (XLA)", t_xla, t_base_xla),
    ]


def run(*, quick: bool = False) -> list[dict]:
    if quick:
        return _case(1, 1024, 5)
    return [r for tokens in (1, 8, 32) for r in _case(tokens, 4096, 11)]
