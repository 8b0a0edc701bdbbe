"""Compose jaxcomp transforms in your own train loop (the README's example, runnable).

A Flax MLP on the digits data: distill from a teacher with the Hinton loss, prune
to 80% inside the optimizer on a cubic schedule, then quantize to int8 and save.

    python examples/own_train_loop.py [--steps 300] [--out example_out/own_train_loop_ckpt]
"""

import argparse

import jax
import optax

import jaxcomp as jc
from jaxcomp.models import MLP, init_params


def main(steps: int, out: str) -> None:
    ds = jc.data.load("digits", seed=0)
    teacher, student = MLP(features=(256, 256)), MLP(features=(128, 128))
    t_params = init_params(teacher, ds.input_shape, seed=0)
    s_params = init_params(student, ds.input_shape, seed=1)

    # 1) a quick teacher, trained on the labels
    def ce(p, x, y):
        logits = teacher.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    t_tx = optax.adam(1e-3)
    t_state = t_tx.init(t_params)

    @jax.jit
    def teacher_step(p, s, x, y):
        g = jax.grad(ce)(p, x, y)
        u, s = t_tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    # 2) the student: Hinton loss, and pruning to 80% on a cubic schedule inside optax
    schedule = jc.sparsity.polynomial_schedule(
        target_sparsity=0.8, begin_step=0, end_step=steps // 2, frequency=10
    )
    tx = jc.sparsity.prune(optax.adam(1e-3), schedule=schedule)
    state = tx.init(s_params)

    @jax.jit
    def student_step(p, s, x, y, t_params):
        def loss(p):
            logits = student.apply({"params": p}, x)
            t_logits = teacher.apply({"params": t_params}, x)
            return jc.distill.hinton_loss(logits, t_logits, y, temperature=4.0, alpha=0.9)

        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step, epoch = 0, 0
    while step < steps:
        for x, y in jc.data.batches(ds.train, 64, seed=0, epoch=epoch):
            t_params, t_state = teacher_step(t_params, t_state, x, y)
            s_params, state = student_step(s_params, state, x, y, t_params)
            step += 1
        epoch += 1

    # 3) quantize to int8 per channel, save with orbax, and look at the result
    q_params = jc.quant.quantize_tree(s_params)
    jc.checkpoint.save(out, q_params, overwrite=True)
    restored = jc.checkpoint.restore(out)
    acc = jc.train.accuracy(
        lambda p, x: student.apply({"params": jc.quant.dequantize_tree(p)}, x),
        restored,
        ds.test.x,
        ds.test.y,
    )
    print(jc.report.format_table(jc.report.leaf_table(restored)))
    print(
        f"\nsparsity {1 - jc.report.count_nonzero(restored) / jc.report.count_params(restored):.2f}"
        f", {jc.checkpoint.disk_bytes(out):,} bytes on disk, test accuracy {acc:.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="example_out/own_train_loop_ckpt")
    args = parser.parse_args()
    main(args.steps, args.out)
