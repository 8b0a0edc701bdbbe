"""A distillation train step against a plain cross-entropy step of the same student.

Hinton loss with the teacher's forward pass inside the step (the expected extra
cost), and with cached teacher logits in the batch (no teacher forward at all).
The ratio is reported, with no target.
"""

from __future__ import annotations

import jax
import optax

from benchmarks._harness import interleaved, row
from jaxcomp import distill, train
from jaxcomp.models import HINTON_SIZES, MLP, init_params


def run(*, quick: bool = False) -> list[dict]:
    batch_size, repeats = (64, 5) if quick else (256, 21)
    student = MLP(features=HINTON_SIZES["small" if quick else "student"])
    teacher = MLP(features=HINTON_SIZES["student" if quick else "teacher"])
    s_params = init_params(student, (784,), seed=0)
    t_params = init_params(teacher, (784,), seed=1)
    x = jax.random.normal(jax.random.key(2), (batch_size, 784))
    y = jax.random.randint(jax.random.key(3), (batch_size,), 0, 10)
    t_logits = teacher.apply({"params": t_params}, x)
    batch = {"x": x, "y": y, "teacher": t_logits}

    def student_apply(p, b, key):
        del key
        return student.apply({"params": p}, b["x"])

    def teacher_apply(tp, b):
        return teacher.apply({"params": tp}, b["x"])

    def hinton(s, t, b):
        return distill.hinton_loss(s, t, b["y"], temperature=4.0, alpha=0.9)

    def ce_loss(p, b, key):
        logits = student_apply(p, b, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), {}

    tx = optax.sgd(1e-2)
    plain = train.make_train_step(ce_loss, tx)
    live = train.make_distill_step(
        student_apply, tx, terms=[("kd", 1.0, hinton)], teacher_apply=teacher_apply
    )
    cached = train.make_distill_step(student_apply, tx, terms=[("kd", 1.0, hinton)])
    key = jax.random.key(0)

    def runner(step, extra):
        state = [jax.tree.map(lambda a: a.copy(), s_params), None]
        state[1] = tx.init(state[0])

        def call():
            state[0], state[1], metrics = step(state[0], state[1], batch, key, *extra)
            return metrics["loss"]

        return call

    rows = []
    for case, step, extra in (
        ("teacher forward in the step", live, (t_params,)),
        ("cached teacher logits", cached, (None,)),
    ):
        t_ours, t_base = interleaved(runner(step, extra), runner(plain, ()), repeats=repeats)
        rows.append(row("distill_step", f"Hinton KD, {case}, batch {batch_size}", t_ours, t_base))
    return rows
