"""Pruning inside a training loop that checkpoints with orbax's CheckpointManager.

Each epoch saves params and the optimizer state (whose ``PruneState`` holds the
masks) asynchronously with its validation accuracy; the manager keeps the last 2
steps and the best step by that metric, and deletes the others. At the end the best
step is restored, quantized to int8 and exported as a compact jaxcomp checkpoint.

    python examples/checkpoint_manager.py [--epochs 12] [--out example_out/ckpt_manager]
"""

import argparse
import shutil
from pathlib import Path

import jax
import optax
import orbax.checkpoint as ocp

import jaxcomp as jc
from jaxcomp.models import MLP, init_params


def main(epochs: int, out: str) -> None:
    out = Path(out).absolute()
    shutil.rmtree(out, ignore_errors=True)
    ds = jc.data.load("digits", seed=0)
    model = MLP(features=(256, 256))
    params = init_params(model, ds.input_shape)
    steps_per_epoch = jc.data.num_batches(ds.train, 64)
    schedule = jc.sparsity.polynomial_schedule(
        0.8, begin_step=0, end_step=(epochs // 2) * steps_per_epoch, frequency=steps_per_epoch
    )
    tx = jc.sparsity.prune(optax.adam(1e-3), schedule=schedule)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    def apply(p, x):
        return model.apply({"params": p}, x)

    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=2),
                policies.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1),  # highest kept
            ]
        ),
        enable_async_checkpointing=True,
    )
    history = {}
    with ocp.CheckpointManager(out / "train", options=options) as manager:
        for epoch in range(epochs):
            for x, y in jc.data.batches(ds.train, 64, seed=0, epoch=epoch):
                params, state = step(params, state, x, y)
            acc = jc.train.accuracy(apply, params, ds.validation.x, ds.validation.y)
            history[epoch] = acc
            manager.save(
                epoch,
                args=ocp.args.StandardSave({"params": params, "opt_state": state}),
                metrics={"val_accuracy": acc},
            )
            sparsity = jc.sparsity.summary(state.masks)[-1].sparsity
            print(f"epoch {epoch}: validation accuracy {acc:.4f}, sparsity {sparsity:.2f}")
        manager.wait_until_finished()
        kept = manager.all_steps()
        best = max(kept, key=lambda step: (history[step], step))
        template = {"params": params, "opt_state": state}
        restored = manager.restore(best, args=ocp.args.StandardRestore(template))

    best_params = restored["params"]
    masks = restored["opt_state"].masks
    jc.checkpoint.save(
        out / "export_int8", jc.quant.quantize_tree(best_params), metadata={"best_step": int(best)}
    )
    export = jc.checkpoint.restore(out / "export_int8")
    acc = jc.train.accuracy(
        lambda p, x: model.apply({"params": jc.quant.dequantize_tree(p)}, x),
        export,
        ds.test.x,
        ds.test.y,
    )
    print(f"\nkept steps {sorted(kept)}; best step {best}")
    print(jc.sparsity.format_summary(jc.sparsity.summary(masks)))
    print(
        f"int8 export: {jc.checkpoint.disk_bytes(out / 'export_int8'):,} bytes on disk, "
        f"test accuracy {acc:.4f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default="example_out/ckpt_manager")
    args = parser.parse_args()
    main(args.epochs, args.out)
