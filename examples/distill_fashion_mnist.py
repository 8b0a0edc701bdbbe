"""Hinton's distillation protocol on Fashion-MNIST: a 2x1200 teacher into a 2x800 student.

For every seed, three models are trained with Adam (cosine decay, batch 128):

- the teacher, a 2x1200 ReLU MLP regularised as in the paper: dropout 0.2 on the
  inputs and 0.5 on the hidden layers (``--input-dropout``, ``--dropout``), trained
  ``--teacher-epochs`` (three times the students' epochs). The paper also jittered
  the inputs; ``--jitter 2`` shifts every training image by up to 2 pixels each way,
  but within this CPU budget (20 epochs) it left the MLP teacher underfitted (87.1%
  test accuracy), so it is off by default;
- the student, a 2x800 ReLU MLP without dropout, trained on the labels alone;
- the same student (same initial weights, same batches, same epochs) distilled
  from the teacher's logits at temperature ``T = 20``: soft KL scaled by ``T^2``
  with weight ``alpha`` plus cross-entropy on the labels with weight ``1 - alpha``
  (``jc.distill.hinton_loss``, ``jc.train.make_distill_step`` with cached logits).

The teacher's logits on the (un-jittered) training images are computed once and
are the transfer set. Test accuracy per seed and mean +- std over the seeds is
printed as a Markdown table and written to ``--out`` (``results.md``, ``results.json``).

    python examples/distill_fashion_mnist.py [--seeds 0 1 2] [--epochs 8]
        [--teacher-epochs 24] [--jitter 0] [--temperature 20] [--alpha 0.9] [--quick]
        [--out DIR]

References: Hinton et al., Distilling the Knowledge in a Neural Network, 2015;
Srivastava et al., Dropout: A Simple Way to Prevent Neural Networks from Overfitting, 2014.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxcomp as jc
from jaxcomp.models import HINTON_SIZES, MLP, init_params

BATCH_SIZE = 128
QUICK_EXAMPLES = 8192


def sizes_of(args) -> dict:
    """Hidden sizes of the teacher and the student (small ones with ``--quick``)."""
    if args.quick:
        return {"teacher": (128, 128), "student": (64, 64)}
    return {"teacher": HINTON_SIZES["teacher"], "student": HINTON_SIZES["student"]}


def jitter(key: jax.Array, x: jax.Array, pixels: int) -> jax.Array:
    """Shifts every image ``[B, H, W, C]`` by its own random offset in ``[-pixels, pixels]``^2.

    The image is edge-padded by ``pixels`` and a window of the original size is cut at
    a random offset (one ``dynamic_slice`` per image under ``vmap``).
    """
    if pixels == 0:
        return x
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (x.shape[0], 2), 0, 2 * pixels + 1)

    def cut(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(cut)(padded, offsets)


def teacher_loss(model: MLP, input_dropout: float, pixels: int):
    """Teacher cross-entropy on jittered, input-dropped images (hidden dropout: ``model``)."""

    def loss_fn(params, batch, key):
        k_jitter, k_input, k_dropout = jax.random.split(key, 3)
        x = jitter(k_jitter, batch["x"], pixels)
        if input_dropout > 0:
            keep = jax.random.bernoulli(k_input, 1.0 - input_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - input_dropout), 0.0)
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": k_dropout})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {}

    return loss_fn


def label_loss(model: MLP):
    """Plain cross-entropy on the labels."""

    def loss_fn(params, batch, key):
        del key
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}

    return loss_fn


def fit(step, params, tx, arrays, *, epochs: int, seed: int, desc: str, distill: bool = False):
    """Runs ``epochs`` epochs of ``step``; returns the params and the mean loss of every epoch."""
    opt_state = tx.init(params)
    key = jax.random.key(seed)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, file=sys.stderr, disable=None)
    for epoch in bar:
        epoch_losses = []
        for batch in jc.train.batch_iterator(arrays, BATCH_SIZE, seed=seed, epoch=epoch):
            key, sub = jax.random.split(key)
            extra = (None,) if distill else ()
            params, opt_state, metrics = step(params, opt_state, batch, sub, *extra)
            epoch_losses.append(metrics["loss"])
        losses.append(float(jnp.mean(jnp.stack(epoch_losses))))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    print(
        f"{desc}: {epochs} epochs in {time.perf_counter() - start:.0f}s, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return params, losses


def run_seed(ds, seed: int, args) -> dict:
    """Teacher, label-only student and distilled student for one seed."""
    n = QUICK_EXAMPLES if args.quick else len(ds.train)
    arrays = {"x": ds.train.x[:n], "y": ds.train.y[:n]}
    steps_per_epoch = n // BATCH_SIZE
    sizes = sizes_of(args)

    def adam(epochs):
        return optax.adam(optax.cosine_decay_schedule(args.lr, epochs * steps_per_epoch))

    def test_accuracy(model, params, split=None):
        split = split or test
        return jc.train.accuracy(lambda p, x: model.apply({"params": p}, x), params, *split)

    test = (ds.test.x, ds.test.y)
    validation = (ds.validation.x, ds.validation.y)
    teacher = MLP(features=sizes["teacher"], num_classes=ds.num_classes, dropout_rate=args.dropout)
    tx = adam(args.teacher_epochs)
    t_params, t_losses = fit(
        jc.train.make_train_step(teacher_loss(teacher, args.input_dropout, args.jitter), tx),
        init_params(teacher, ds.input_shape, seed=1000 + seed),
        tx,
        arrays,
        epochs=args.teacher_epochs,
        seed=seed,
        desc=f"seed {seed}: teacher",
    )
    result = {"seed": seed, "teacher": test_accuracy(teacher, t_params)}
    result["validation"] = {"teacher": test_accuracy(teacher, t_params, validation)}

    student = MLP(features=sizes["student"], num_classes=ds.num_classes)
    tx = adam(args.epochs)
    s_params, s_losses = fit(
        jc.train.make_train_step(label_loss(student), tx),
        init_params(student, ds.input_shape, seed=seed),
        tx,
        arrays,
        epochs=args.epochs,
        seed=seed,
        desc=f"seed {seed}: student, labels only",
    )
    result["labels_only"] = test_accuracy(student, s_params)
    result["validation"]["labels_only"] = test_accuracy(student, s_params, validation)
    val = result["validation"]
    if val["teacher"] <= val["labels_only"]:
        print(
            f"seed {seed}: warning: the teacher ({val['teacher']:.4f} validation accuracy) is "
            f"not more accurate than the student trained on labels ({val['labels_only']:.4f}); "
            "soft targets "
            "can hardly help (train the teacher longer)",
            file=sys.stderr,
            flush=True,
        )

    teacher_logits = jc.train.predict(
        lambda p, x: teacher.apply({"params": p}, x), t_params, arrays["x"]
    )
    temperature, alpha = args.temperature, args.alpha

    def hinton(s, t, batch):
        return jc.distill.hinton_loss(s, t, batch["y"], temperature=temperature, alpha=alpha)

    d_step = jc.train.make_distill_step(
        lambda p, batch, key: student.apply({"params": p}, batch["x"]),
        tx,
        terms=[("hinton", 1.0, hinton)],
    )
    d_params, d_losses = fit(
        d_step,
        init_params(student, ds.input_shape, seed=seed),  # the same start as labels only
        tx,
        {**arrays, "teacher": teacher_logits},
        epochs=args.epochs,
        seed=seed,
        desc=f"seed {seed}: student, distilled",
        distill=True,
    )
    result["distilled"] = test_accuracy(student, d_params)
    result["validation"]["distilled"] = test_accuracy(student, d_params, validation)
    result["losses"] = {"teacher": t_losses, "labels_only": s_losses, "distilled": d_losses}
    print(
        f"seed {seed}: validation accuracy teacher {val['teacher']:.4f}, labels only "
        f"{val['labels_only']:.4f}, distilled {val['distilled']:.4f}; test accuracy teacher "
        f"{result['teacher']:.4f}, labels only {result['labels_only']:.4f}, distilled "
        f"{result['distilled']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return result


def table_rows(results: list[dict], args) -> list[dict]:
    """One row per model: its epochs, test accuracy per seed, mean and std."""
    sizes = {k: "x".join(map(str, [len(v), v[0]])) for k, v in sizes_of(args).items()}
    models = (
        ("teacher", f"teacher {sizes['teacher']}, dropout" + (" + jitter" if args.jitter else "")),
        ("labels_only", f"student {sizes['student']}, labels only"),
        ("distilled", f"student {sizes['student']}, distilled (T = {args.temperature:g})"),
    )
    rows = []
    for key, name in models:
        accs = np.array([r[key] for r in results])
        epochs = args.teacher_epochs if key == "teacher" else args.epochs
        row = {"model": name, "epochs": epochs}
        row.update({f"seed {r['seed']}": r[key] for r in results})
        row["mean"] = float(accs.mean())
        row["std"] = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist", help="fashion_mnist, mnist or digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="student epochs (both students)")
    parser.add_argument("--teacher-epochs", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term")
    parser.add_argument("--dropout", type=float, default=0.5, help="teacher hidden dropout")
    parser.add_argument("--input-dropout", type=float, default=0.2, help="teacher input dropout")
    parser.add_argument("--jitter", type=int, default=0, help="teacher input shifts, pixels")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--quick", action="store_true", help="small MLPs, 8192 images, 2 and 3 epochs"
    )
    parser.add_argument("--out", default="example_out/distill_fashion_mnist")
    if parser.parse_known_args(argv)[0].quick:  # quick defaults; explicit options still win
        parser.set_defaults(epochs=2, teacher_epochs=3)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ds = jc.data.load(args.data, seed=0)
    results = [run_seed(ds, seed, args) for seed in args.seeds]
    rows = table_rows(results, args)
    seconds = time.perf_counter() - start
    table = jc.report.format_table(rows, markdown=True)
    print(
        f"\n{args.data}, test accuracy; T = {args.temperature:g}, alpha = {args.alpha:g}, "
        f"batch {BATCH_SIZE}, {len(args.seeds)} seeds, {seconds:.0f}s\n"
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"settings": settings, "seconds": seconds, "rows": rows, "per_seed": results}
    jc.report.write_json(out / "results.json", payload)
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return rows


if __name__ == "__main__":
    main()
