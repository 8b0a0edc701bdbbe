"""Forward time of an MLP with 50% of its hidden neurons removed, against the dense MLP.

``remove_neurons`` shrinks the 784-2048-2048-10 MLP to 784-1024-1024-10 (a real
smaller dense model, not a mask); batch 256, jitted forward. Expect about 2x faster.
"""

from __future__ import annotations

import jax

from benchmarks._harness import interleaved, row
from jaxcomp import sparsity
from jaxcomp.models import MLP, init_params


def run(*, quick: bool = False) -> list[dict]:
    width = 512 if quick else 2048
    model = MLP(features=(width, width), num_classes=10)
    params = init_params(model, (784,))
    pairs = [("Dense_0", "Dense_1"), ("Dense_1", "Dense_2")]
    keep = sparsity.select_neurons(params, pairs, 0.5)
    small, widths = sparsity.remove_neurons(params, pairs, keep)
    small_model = MLP(features=(widths["Dense_0"], widths["Dense_1"]), num_classes=10)
    x = jax.random.normal(jax.random.key(1), (256, 784))
    dense_fwd = jax.jit(lambda p: model.apply({"params": p}, x))
    small_fwd = jax.jit(lambda p: small_model.apply({"params": p}, x))
    t_ours, t_base = interleaved(
        lambda: small_fwd(small), lambda: dense_fwd(params), repeats=5 if quick else 21
    )
    return [
        row(
            "structured",
            f"MLP 784-{width}-{width}-10, 50% neurons removed, forward vs dense",
            t_ours,
            t_base,
            target="about 0.5x",
            speedup=t_base / t_ours,
        )
    ]
