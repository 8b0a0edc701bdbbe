"""W8A8 Dense forward (int8 x int8 -> int32, per-token activation scales) against float32.

On a CPU with AMX the native kernel runs (jaxcomp/quant/kernels/int8_matmul.cc); the
rows marked "XLA" show XLA's own lowering of the same function, side by side.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks._harness import compiled_without_native, interleaved, row
from jaxcomp import quant
from jaxcomp.quant import _native

DIMS = (((1,), (0,)), ((), ()))


def _case(tokens: int, dim: int, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    q = quant.quantize(w, bits=8)
    dense = jax.jit(lambda x, w: x @ w)
    w8a8 = jax.jit(lambda x, q: quant.w8a8_dot_general(x, q, DIMS))
    shape = f"[{tokens}x{dim}]@[{dim}x{dim}]"
    kernel = "AMX kernel" if _native.native_status().w8a8 else "XLA"
    packed = quant.prepack(q)  # weights stored once in the order the AMX kernel reads
    t_ours, t_base = interleaved(lambda: w8a8(x, packed), lambda: dense(x, w), repeats=repeats)
    rows = [
        row(
            "w8a8",
            f"w8a8_dot_general {shape}, prepacked weights ({kernel})",
            t_ours,
            t_base,
            target="<= 0.125 (8x)",
            passed=t_ours / t_base <= 0.125,
            weight_bytes_ratio=packed.nbytes / w.nbytes,
        )
    ]
    t_ours, t_base = interleaved(lambda: w8a8(x, q), lambda: dense(x, w), repeats=repeats)
    rows.append(row("w8a8", f"w8a8_dot_general {shape} ({kernel})", t_ours, t_base))
    xla = compiled_without_native(lambda x, q: quant.w8a8_dot_general(x, q, DIMS), x, q)
    t_ours, t_base = interleaved(lambda: xla(x, q), lambda: dense(x, w), repeats=repeats)
    rows.append(row("w8a8", f"w8a8_dot_general {shape} (XLA)", t_ours, t_base))
    # the same through an unmodified nn.Dense with a quantized params tree
    model = nn.Dense(dim)
    params = {"kernel": w, "bias": jnp.zeros(dim, jnp.float32)}
    qparams = quant.prepack(quant.quantize_tree(params))
    ours = jax.jit(lambda p, x: quant.quantized_apply(model, {"params": p}, x, mode="w8a8"))
    base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    t_ours, t_base = interleaved(lambda: ours(qparams, x), lambda: base(params, x), repeats=repeats)
    rows.append(
        row(
            "w8a8",
            f"quantized_apply(nn.Dense) {shape}, prepacked weights",
            t_ours,
            t_base,
            target="<= 0.125 (8x)",
            passed=t_ours / t_base <= 0.125,
        )
    )
    # XLA's raw int8 dot (codes given, no quantization or rescale): what XLA alone reaches
    a = jax.random.randint(jax.random.key(2), (tokens, dim), -127, 128, jnp.int32).astype(jnp.int8)
    raw = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DIMS, preferred_element_type=jnp.int32))
    t_ours, t_base = interleaved(lambda: raw(a, q.codes), lambda: dense(x, w), repeats=repeats)
    rows.append(row("w8a8", f"XLA raw int8 dot (codes given) {shape}", t_ours, t_base))
    return rows


def _decode(tokens: int, dim: int, repeats: int) -> list[dict]:
    """Few tokens (decoding): prepacked W8A8 and XLA's lowering, each against float32."""
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (dim, dim), jnp.float32) / dim**0.5
    q = quant.quantize(w, bits=8)
    packed = quant.prepack(q)
    dense = jax.jit(lambda x, w: x @ w)
    w8a8 = jax.jit(lambda x, q: quant.w8a8_dot_general(x, q, DIMS))
    xla = compiled_without_native(lambda x, q: quant.w8a8_dot_general(x, q, DIMS), x, q)
    shape = f"[{tokens}x{dim}]@[{dim}x{dim}]"
    kernel = "AMX kernel" if _native.native_status().w8a8 else "XLA"
    t_ours, t_base = interleaved(lambda: w8a8(x, packed), lambda: dense(x, w), repeats=repeats)
    rows = [row("w8a8", f"w8a8_dot_general {shape}, prepacked weights ({kernel})", t_ours, t_base)]
    t_ours, t_base = interleaved(lambda: xla(x, q), lambda: dense(x, w), repeats=repeats)
    rows.append(row("w8a8", f"w8a8_dot_general {shape} (XLA)", t_ours, t_base))
    return rows


def run(*, quick: bool = False) -> list[dict]:
    if quick:
        return _case(64, 1024, 5)
    return _case(256, 4096, 11) + _decode(1, 4096, 11) + _decode(8, 4096, 11)
