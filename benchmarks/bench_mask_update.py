"""A mask-update step (a new exact top-k over every pruned leaf) against a training step.

Model: the ~10M-parameter MLP of ``bench_masked_optimizer`` (784-2048-2048-2048-10, adam).
Rows, all against the same plain jitted train step (forward, backward, adam):

- ``compute_masks`` at 90% over every kernel, jitted (the exact counting top-k of
  ``jaxcomp.sparsity``: a threshold search bracketed by a strided sample and
  narrowed by interpolation, about ten counting passes per leaf): target <= 3x;
- the same with ``scope="global"`` (one threshold over all kernels at once);
- a RigL train step on an update step (drop and regrow: two top-ks per leaf);
- the baseline approach of a full ``jnp.argsort`` of every pruned leaf (what
  jaxpruner does), for reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    x = jax.random.normal(jax.random.key(1), (64, 784))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 10)

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def stepper(tx):
        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        state = [params, tx.init(params)]

        def call():
            state[0], state[1] = step(*state)
            return state[0]

        return call, state

    masks_fn = jax.jit(lambda p: sparsity.compute_masks(p, sparsity=0.9))
    global_fn = jax.jit(lambda p: sparsity.compute_masks(p, sparsity=0.9, scope="global"))

    @jax.jit
    def argsort_masks(p):
        def one(w):
            if w.ndim < 2:
                return None
            order = jnp.argsort(jnp.abs(w).ravel())
            keep = w.size - round(0.9 * w.size)
            return jnp.zeros(w.size, bool).at[order[-keep:]].set(True).reshape(w.shape)

        return jax.tree.map(one, p)

    rigl_tx = sparsity.rigl(optax.adam(1e-3), masks, frequency=1, end_step=10**6)
    rows = []
    repeats = 5 if quick else 11
    with jax.numpy_dtype_promotion("standard"):
        train, _ = stepper(optax.adam(1e-3))
        rigl_step, _ = stepper(rigl_tx)
        cases = (
            ("compute_masks 90%, counting top-k", lambda: masks_fn(params), 3.0),
            ("compute_masks 90%, scope='global'", lambda: global_fn(params), None),
            ("RigL step on an update step (2 top-ks)", rigl_step, None),
            ("full argsort of every leaf (jaxpruner-style)", lambda: argsort_masks(params), None),
        )
        for case, fn, target in cases:
            t_ours, t_base = interleaved(fn, train, repeats=repeats)
            rows.append(
                row(
                    "mask_update",
                    f"{case} vs adam train step, {n_params / 1e6:.1f}M params",
                    t_ours,
                    t_base,
                    target=f"<= {target:g}x" if target else "",
                    passed=(t_ours / t_base <= target) if target else None,
                )
            )
    return rows
