"""Chunked KL over tokens against the naive full-logit KL: peak memory and time.

Both compute the forward KL and its gradient w.r.t. the student's hidden states
and unembedding from hidden states ``[B, T, D]`` and ``[D, V]`` projections. The
naive one forms the full ``[B, T, V]`` float32 logits of both models (and their
gradients); :func:`jaxcomp.distill.chunked_kl` forms ``chunk_size`` tokens at a
time. Memory is the compiled program's temporary buffers
(``compile().memory_analysis().temp_size_in_bytes``), measured, not estimated.
Target at B=8, T=512, V=32k: chunked temp memory <= 0.25x naive.
"""

from __future__ import annotations

import jax

from benchmarks._harness import interleaved, row
from jaxcomp.distill import chunked_kl, kl_div


def run(*, quick: bool = False) -> list[dict]:
    b, t, v, d = (2, 128, 4096, 64) if quick else (8, 512, 32768, 128)
    chunk = 32 if quick else 256
    keys = jax.random.split(jax.random.key(0), 4)
    hs = jax.random.normal(keys[0], (b, t, d))
    ws = jax.random.normal(keys[1], (d, v)) / d**0.5
    ht = jax.random.normal(keys[2], (b, t, d))
    wt = jax.random.normal(keys[3], (d, v)) / d**0.5

    def chunked(hs, ws, ht, wt):
        return chunked_kl(hs, ws, ht, wt, chunk_size=chunk)

    def naive(hs, ws, ht, wt):
        return kl_div(hs @ ws, ht @ wt)

    ours = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))
    base = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))
    args = (hs, ws, ht, wt)
    mem_ours = ours.lower(*args).compile().memory_analysis().temp_size_in_bytes
    mem_base = base.lower(*args).compile().memory_analysis().temp_size_in_bytes
    err = abs(float(ours(*args)[0]) - float(base(*args)[0]))
    t_ours, t_base = interleaved(
        lambda: ours(*args), lambda: base(*args), warmup=1, repeats=3 if quick else 5
    )
    mem_ratio = mem_ours / mem_base
    case = f"B={b} T={t} V={v} D={d} chunk={chunk}"
    return [
        row(
            "chunked_kl",
            f"{case}: temp MiB (in the ms columns)",
            mem_ours / 2**20 / 1e3,  # row() reports seconds * 1e3: these columns show MiB
            mem_base / 2**20 / 1e3,
            target="<= 0.25x",
            passed=mem_ratio <= 0.25,
            ours_bytes=mem_ours,
            naive_bytes=mem_base,
        ),
        row("chunked_kl", f"{case}: time (value+grad)", t_ours, t_base, abs_err=err),
    ]
