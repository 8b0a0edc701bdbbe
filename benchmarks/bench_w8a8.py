"""W8A8 Dense forward (int8 x int8 -> int32, per-token activation scales) against float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks._harness import interleaved, row
from jaxcomp import quant

DIMS = (((1,), (0,)), ((), ()))


def _case(tokens: int, dim: int, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    q = quant.quantize(w, bits=8)
    dense = jax.jit(lambda x, w: x @ w)
    w8a8 = jax.jit(lambda x, q: quant.w8a8_dot_general(x, q, DIMS))
    t_ours, t_base = interleaved(lambda: w8a8(x, q), lambda: dense(x, w), repeats=repeats)
    shape = f"[{tokens}x{dim}]@[{dim}x{dim}]"
    rows = [
        row(
            "w8a8",
            f"w8a8_dot_general {shape}",
            t_ours,
            t_base,
            target="<= 0.125 (8x)",
            passed=t_ours / t_base <= 0.125,
            weight_bytes_ratio=q.nbytes / w.nbytes,
        )
    ]
    # the same through an unmodified nn.Dense with a quantized params tree
    model = nn.Dense(dim)
    params = {"kernel": w, "bias": jnp.zeros(dim, jnp.float32)}
    qparams = quant.quantize_tree(params)
    ours = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x, mode="w8a8"))
    base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    t_ours, t_base = interleaved(lambda: ours(qparams, x), lambda: base(params, x), repeats=repeats)
    rows.append(
        row(
            "w8a8",
            f"quantized_apply(nn.Dense) {shape}",
            t_ours,
            t_base,
            target="<= 0.125 (8x)",
            passed=t_ours / t_base <= 0.125,
        )
    )
    # the ceiling: XLA's raw int8 dot (codes given, no quantization or rescale) on this machine
    a = jax.random.randint(jax.random.key(2), (tokens, dim), -127, 128, jnp.int32).astype(jnp.int8)
    raw = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DIMS, preferred_element_type=jnp.int32))
    t_ours, t_base = interleaved(lambda: raw(a, q.codes), lambda: dense(x, w), repeats=repeats)
    rows.append(row("w8a8", f"raw int8 dot, the ceiling {shape}", t_ours, t_base))
    return rows


def run(*, quick: bool = False) -> list[dict]:
    if quick:
        return _case(64, 1024, 5)
    return _case(256, 4096, 11)
