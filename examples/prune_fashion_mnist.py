"""Pruning a 2x800 MLP on Fashion-MNIST: dense, gradual magnitude 90%, 2:4 and RigL 90%.

Every run trains the same student (Hinton et al.'s 2x800 ReLU MLP, adam) for the
same number of steps:

- dense: plain ``optax.adam``;
- gradual magnitude pruning to 90% of every kernel (Zhu & Gupta's cubic schedule
  over the first 60% of training, masks updated 20 times), ``jc.sparsity.prune``;
- 2:4: ``prune`` with ``pattern="2:4"`` applied once after 20% of training;
- RigL at 90% (ERK allocation, random initial masks, drop fraction 0.3 cosine-decayed
  to 0 at 75% of training, mask updates every 100 steps), ``jc.sparsity.rigl``.

The table gives test accuracy, non-zero parameters and the measured bytes of the
params: float32 dense, and compact (``compress_tree``: bitmask for unstructured
masks, N:M packing for 2:4).

    python examples/prune_fashion_mnist.py [--epochs 8] [--quick] [--data fashion_mnist]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import jaxcomp as jc
from jaxcomp.models import MLP, init_params
from jaxcomp.rules import tree_nbytes


def _methods(params, steps: int, quick: bool):
    sp = jc.sparsity
    freq = max(1, steps * 3 // 5 // 20)
    end = freq * 20
    begin = 0
    gradual = sp.polynomial_schedule(0.9, begin_step=begin, end_step=end, frequency=freq)
    masks = sp.compute_masks(
        params, sparsity=0.9, scope="erk", score="random", key=jax.random.key(1)
    )
    rigl_every = 10 if quick else 100
    return {
        "dense": (optax.adam(1e-3), None),
        "gradual magnitude 90%": (sp.prune(optax.adam(1e-3), schedule=gradual), None),
        "2:4": (
            sp.prune(
                optax.adam(1e-3),
                schedule=sp.one_shot_schedule(0.5, step=steps // 5),
                pattern="2:4",
            ),
            None,
        ),
        "RigL 90% (ERK)": (
            sp.rigl(optax.adam(1e-3), masks, frequency=rigl_every, end_step=steps * 3 // 4),
            masks,
        ),
    }


def _current_masks(state):
    """The masks inside a prune/rigl state (None for plain adam)."""
    return getattr(state, "masks", None)


def main(data: str, epochs: int, quick: bool, batch_size: int) -> list[dict]:
    ds = jc.data.load(data, seed=0)
    model = MLP(features=(64, 64) if quick else (800, 800), num_classes=ds.num_classes)
    params0 = init_params(model, ds.input_shape, seed=0)
    steps = epochs * (len(ds.train) // batch_size)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    rows = []
    for name, (tx, start_masks) in _methods(params0, steps, quick).items():
        t0 = time.perf_counter()
        params = params0 if start_masks is None else jc.sparsity.apply_masks(params0, start_masks)
        state = tx.init(params)

        @jax.jit
        def step(p, s, x, y, tx=tx):
            u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
            return optax.apply_updates(p, u), s

        with jax.numpy_dtype_promotion("standard"):  # optax 0.2.8 adam under strict promotion
            for epoch in range(epochs):
                for x, y in jc.data.batches(ds.train, batch_size, seed=0, epoch=epoch):
                    params, state = step(params, state, x, y)
        acc = jc.train.accuracy(lambda p, x: model.apply({"params": p}, x), params, *_xy(ds.test))
        masks = _current_masks(state)
        if masks is None:
            compact = params
        elif name == "2:4":
            compact = jc.sparsity.compress_tree(params, masks, format="2:4")
        else:
            compact = jc.sparsity.compress_tree(params, masks)
        assert all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(jc.sparsity.decompress_tree(compact)),
                jax.tree.leaves(params),
                strict=True,
            )
        )
        n_params = sum(int(x.size) for x in jax.tree.leaves(params))
        nonzero = int(jc.sparsity.count_nonzero(params))
        rows.append(
            {
                "method": name,
                "test accuracy": round(acc, 4),
                "non-zeros": nonzero,
                "sparsity": round(1 - nonzero / n_params, 4),
                "float32 bytes": tree_nbytes(params),
                "compact bytes": tree_nbytes(compact),
                "seconds": f"{time.perf_counter() - t0:.1f}",
            }
        )
        print(f"{name}: test accuracy {acc:.4f}", flush=True)
    print(f"\n{data}, {epochs} epochs, {steps} steps of batch {batch_size}\n")
    print(jc.report.format_table(rows, markdown=True))
    return rows


def _xy(split):
    return split.x, split.y


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist", help="fashion_mnist, mnist or digits")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="64-wide MLP, for smoke tests")
    args = parser.parse_args()
    main(args.data, args.epochs, args.quick, args.batch_size)
