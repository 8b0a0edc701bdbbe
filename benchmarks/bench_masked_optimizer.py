"""An optimizer that keeps pruning masks, against plain ``optax.adam``, on a ~10M-parameter MLP.

Two cases: the optimizer update alone (``tx.update`` + ``apply_updates`` on given
gradients) and a whole train step (forward, backward, update). Target: the
masked train step at most 1.05x the plain one.
"""

from __future__ import annotations

import jax
import optax

from benchmarks._harness import interleaved, row
from jaxcomp import sparsity
from jaxcomp.models import MLP, init_params


def run(*, quick: bool = False) -> list[dict]:
    widths = (512, 512) if quick else (2048, 2048, 2048)
    model = MLP(features=widths, num_classes=10)
    params = init_params(model, (784,))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    masks = sparsity.compute_masks(params, sparsity=0.9)
    params = sparsity.apply_masks(params, masks)
    batch = 64
    x = jax.random.normal(jax.random.key(1), (batch, 784))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(params)
    plain = optax.adam(1e-3)
    masked = optax.chain(optax.adam(1e-3), sparsity.keep_masks(masks))

    def make(tx, whole_step):
        @jax.jit
        def step(p, s):
            g = jax.grad(loss)(p) if whole_step else grads
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = [params, tx.init(params)]

        def call():
            state[0], state[1] = step(*state)
            return state[0]

        return call

    rows = []
    with jax.numpy_dtype_promotion("standard"):
        repeats = 5 if quick else 21
        for case, whole in (("update only", False), ("train step", True)):
            t_ours, t_base = interleaved(make(masked, whole), make(plain, whole), repeats=repeats)
            target = "<= 1.05x" if whole else ""
            rows.append(
                row(
                    "masked_optimizer",
                    f"{case}, {n_params / 1e6:.1f}M params, adam",
                    t_ours,
                    t_base,
                    target=target,
                    passed=(t_ours / t_base <= 1.05) if whole else None,
                )
            )
    return rows
