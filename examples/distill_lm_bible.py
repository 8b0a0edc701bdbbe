"""Distilling a small transformer language model on the King James Bible: KL, reverse KL, JSD.

A character-level GPT teacher (4 layers, width 256) is trained on the start of the
text and cached in ``--out/teacher`` (a rerun with the same settings restores it).
Then one student (2 layers, width 128) per objective is trained from the same
initial weights on the same batches for the same number of steps:

- labels only: cross-entropy on the next character;
- forward KL ``KL(p_teacher || q_student)`` (``jc.distill.kl_div``);
- reverse KL ``KL(q_student || p_teacher)`` (``jc.distill.reverse_kl``);
- generalized JSD with ``beta = 0.5`` (``jc.distill.generalized_jsd``, GKD's loss);

each distillation objective optionally plus ``--ce-weight`` times the
cross-entropy. The teacher's logits for a batch are computed once and handed to every
student's ``jc.train.make_distill_step`` as cached outputs. The held-out text is the
contiguous tail (the last 5% of the characters, ``jc.data.load_corpus``); the table
gives its perplexity and the forward and reverse KL between teacher and student per
character, written to ``--out`` as ``results.md`` and ``results.json``.

    python examples/distill_lm_bible.py [--steps 400] [--teacher-steps 400]
        [--ce-weight 0] [--methods ce fkl rkl jsd] [--quick] [--out DIR]

References: Hinton et al., Distilling the Knowledge in a Neural Network, 2015;
Agarwal et al., On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes, 2023; Gu et al., MiniLLM: Knowledge Distillation of Large
Language Models, 2023.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxcomp as jc
from jaxcomp.models import GPT, GPTConfig


def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of ``logits [B, T, V]`` against ``tokens [B, T]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


METHODS = {
    "ce": "labels only (cross-entropy)",
    "fkl": "forward KL",
    "rkl": "reverse KL",
    "jsd": "generalized JSD (beta 0.5)",
}


def objectives(ce_weight: float, methods=tuple(METHODS)) -> dict[str, list]:
    """The students' loss terms ``(name, weight, fn(student, teacher, batch))`` by row name."""

    def ce(s, t, b):
        return cross_entropy(s, b["targets"])

    divergences = {
        "fkl": lambda s, t, b: jc.distill.kl_div(s, t),
        "rkl": lambda s, t, b: jc.distill.reverse_kl(s, t),
        "jsd": lambda s, t, b: jc.distill.generalized_jsd(s, t, beta=0.5),
    }
    rows = {}
    for method in methods:
        name = METHODS[method]
        if method == "ce":
            rows[name] = [("ce", 1.0, ce)]
            continue
        terms = [("divergence", 1.0, divergences[method])]
        if ce_weight > 0:
            terms.append(("ce", ce_weight, ce))
            name = f"{name} + {ce_weight:g} CE"
        rows[name] = terms
    return rows


def optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up (5% of the steps) and cosine decay to lr / 10, clipped at 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, steps // 20), max(2, steps), end_value=lr / 10
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def batches(ids: np.ndarray, batch_size: int, seq_len: int, steps: int, seed: int):
    """``steps`` dicts of ``tokens`` (inputs) and ``targets``, cycling over epochs."""
    produced, epoch = 0, 0
    while produced < steps:
        for w in jc.data.lm_batches(ids, batch_size, seq_len, seed=seed, epoch=epoch):
            yield {"tokens": w[:, :-1], "targets": w[:, 1:]}
            produced += 1
            if produced == steps:
                return
        epoch += 1


def train_teacher(model: GPT, corpus, args) -> tuple[dict, list[float]]:
    """Trains the teacher on cross-entropy; returns its params and the loss every 50 steps."""
    params = model.init(jax.random.key(1000), jnp.zeros((1, args.seq_len), jnp.int32))["params"]
    tx = optimizer(args.lr, args.teacher_steps)

    def loss_fn(p, batch, key):
        del key
        return cross_entropy(model.apply({"params": p}, batch["tokens"]), batch["targets"]), {}

    step = jc.train.make_train_step(loss_fn, tx)
    opt_state = tx.init(params)
    stream = batches(corpus.train, args.batch_size, args.seq_len, args.teacher_steps, seed=1)
    losses, window = [], []
    start = time.perf_counter()
    bar = tqdm(stream, total=args.teacher_steps, desc="teacher", file=sys.stderr, disable=None)
    for batch in bar:
        params, opt_state, metrics = step(params, opt_state, batch, None)
        window.append(metrics["loss"])
        if len(window) == 50 or len(losses) * 50 + len(window) == args.teacher_steps:
            losses.append(float(jnp.mean(jnp.stack(window))))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    print(
        f"teacher: {args.teacher_steps} steps in {time.perf_counter() - start:.0f}s, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return params, losses


def teacher_settings(config: GPTConfig, args, vocab: str) -> dict:
    """What the cached teacher depends on; a cache with other settings is retrained."""
    return {
        "config": dataclasses.asdict(config),
        "steps": args.teacher_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "vocab": vocab,
    }


def load_or_train_teacher(model: GPT, corpus, args, out: Path) -> tuple[dict, bool]:
    """The teacher from ``out/teacher`` if it was trained with the same settings, else trained."""
    path = out / "teacher"
    settings = teacher_settings(model.config, args, corpus.tokenizer.chars)
    if path.exists() and jc.checkpoint.read_metadata(path)["metadata"].get("settings") == settings:
        print(f"teacher: restored from {path}", file=sys.stderr, flush=True)
        return jc.checkpoint.restore(path), True
    params, losses = train_teacher(model, corpus, args)
    jc.checkpoint.save(
        path, params, metadata={"settings": settings, "losses": losses}, overwrite=True
    )
    return params, False


def evaluator(model: GPT, teacher: GPT):
    """``evaluate(params, t_params, windows)``: held-out perplexity and KL to the teacher.

    Per character: perplexity ``exp(CE)``, forward ``KL(p_t || q_s)`` and reverse
    ``KL(q_s || p_t)``, averaged over the ``[B, T + 1]`` windows. One compilation
    serves every student of the same shape.
    """

    @jax.jit
    def stats(params, t_params, w):
        tokens, targets = w[:, :-1], w[:, 1:]
        t_logits = teacher.apply({"params": t_params}, tokens)
        logits = model.apply({"params": params}, tokens)
        return jnp.stack(
            [
                cross_entropy(logits, targets),
                jc.distill.kl_div(logits, t_logits),
                jc.distill.reverse_kl(logits, t_logits),
            ]
        )

    def evaluate(params, t_params, windows) -> dict:
        ce, fkl, rkl = np.mean([np.asarray(stats(params, t_params, w)) for w in windows], axis=0)
        return {
            "perplexity": math.exp(float(ce)),
            "KL(teacher, student)": float(fkl),
            "KL(student, teacher)": float(rkl),
        }

    return evaluate


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="student steps (every student)")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ce-weight", type=float, default=0.0, help="CE added to divergences")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches scored")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="students"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models, 60 and 30 steps")
    parser.add_argument("--out", default="example_out/distill_lm_bible")
    if parser.parse_known_args(argv)[0].quick:  # quick defaults; explicit options still win
        parser.set_defaults(steps=30, teacher_steps=60, batch_size=16, seq_len=32, eval_batches=2)
    args = parser.parse_args(argv)
    teacher_size = {"n_layer": 4, "n_head": 4, "d_model": 256, "d_ff": 1024}
    student_size = {"n_layer": 2, "n_head": 4, "d_model": 128, "d_ff": 512}
    if args.quick:
        teacher_size = {"n_layer": 2, "n_head": 2, "d_model": 64, "d_ff": 128}
        student_size = {"n_layer": 1, "n_head": 2, "d_model": 32, "d_ff": 64}
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = jc.data.load_corpus(tokenizer="char")
    held_out = jc.data.lm_batches(corpus.test, args.batch_size, args.seq_len, seed=0, shuffle=False)
    windows = list(held_out)[: args.eval_batches]

    base = {"vocab_size": corpus.vocab_size, "max_len": args.seq_len}
    teacher = GPT(GPTConfig(**base, **teacher_size))
    t_params, cached = load_or_train_teacher(teacher, corpus, args, out)
    rows = [
        {
            "model": f"teacher {teacher_size['n_layer']}x{teacher_size['d_model']}",
            "params": jc.report.count_params(t_params),
            "steps": args.teacher_steps,
            **evaluator(teacher, teacher)(t_params, t_params, windows),
        }
    ]

    student = GPT(GPTConfig(**base, **student_size))
    init = student.init(jax.random.key(args.seed), jnp.zeros((1, args.seq_len), jnp.int32))
    teacher_logits = jax.jit(lambda p, tokens: teacher.apply({"params": p}, tokens))
    runs = {}
    for name, terms in objectives(args.ce_weight, args.methods).items():
        tx = optimizer(args.lr, args.steps)
        step = jc.train.make_distill_step(
            lambda p, b, k: student.apply({"params": p}, b["tokens"]), tx, terms=terms
        )
        params = jax.tree.map(jnp.copy, init["params"])  # the step donates its params
        runs[name] = {"step": step, "params": params, "opt": tx.init(params), "losses": []}
    stream = batches(corpus.train, args.batch_size, args.seq_len, args.steps, seed=args.seed)
    t0 = time.perf_counter()
    bar = tqdm(stream, total=args.steps, desc="students", file=sys.stderr, disable=None)
    for i, batch in enumerate(bar):
        batch = {**batch, "teacher": teacher_logits(t_params, batch["tokens"])}
        for run in runs.values():
            run["params"], run["opt"], metrics = run["step"](
                run["params"], run["opt"], batch, None, None
            )
            if i % 50 == 0 or i == args.steps - 1:
                run["losses"].append(float(metrics["loss"]))
    print(
        f"students: {len(runs)} x {args.steps} steps in {time.perf_counter() - t0:.0f}s",
        file=sys.stderr,
        flush=True,
    )
    size = f"{student_size['n_layer']}x{student_size['d_model']}"
    evaluate = evaluator(student, teacher)
    for name, run in runs.items():
        rows.append(
            {
                "model": f"student {size}, {name}",
                "params": jc.report.count_params(run["params"]),
                "steps": args.steps,
                **evaluate(run["params"], t_params, windows),
            }
        )
        print(
            f"{name}: training loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}",
            file=sys.stderr,
        )
    seconds = time.perf_counter() - start
    tokens = len(windows) * args.batch_size * args.seq_len
    table = jc.report.format_table(rows, markdown=True)
    print(
        f"\nKing James Bible, characters; held-out: {tokens:,} characters of the last 5%; "
        f"batch {args.batch_size} x {args.seq_len}; teacher "
        f"{'restored from cache' if cached else 'trained'}; {seconds:.0f}s\n"
    )
    print(table)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    losses = {name: run["losses"] for name, run in runs.items()}
    payload = {
        "settings": settings,
        "seconds": seconds,
        "teacher_cached": cached,
        "rows": rows,
        "training_losses": losses,
    }
    jc.report.write_json(out / "results.json", json.loads(json.dumps(payload, default=float)))
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return rows


if __name__ == "__main__":
    main()
