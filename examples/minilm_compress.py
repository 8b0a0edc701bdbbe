"""Compressing and distilling the pretrained all-MiniLM-L6-v2 sentence encoder on real text.

The 6-layer teacher (22.7M parameters) encodes verses of the King James Bible and the
hand-scored English sentence pairs of ``minilm_pairs.py``. Every compressed row
quantizes or prunes the same leaves, the 36 Dense kernels of the 6 layers (the
embeddings, norms and biases stay float32), and is compared with the float32 model:

* ``mean_cosine`` / ``min_cosine``: cosine of each compressed embedding with the
  float32 embedding of the same text (both unit norm), over the evaluated verses and
  the pair sentences;
* ``spearman_fp32``: Spearman correlation of the model's cosine similarities over the
  pairs with those of the float32 model; ``spearman_labels``: with the hand scores;
* ``bytes``: measured bytes of the stored tree (packed int4 codes, int8 codes and
  scales, compact 2:4 / bitmask sparse formats), whole model and the 6 layers alone.

Rows: int8 per channel (weight-only and W8A8 execution, and W8A8 after SmoothQuant);
int4 at group 32/64/128 by round-to-nearest, GPTQ and AWQ; 2:4 by SparseGPT and by
magnitude; Wanda at 50% (unstructured, per output neuron). ``--quick`` keeps int8,
int4 at group 64 and magnitude 2:4, on fewer texts and steps.
GPTQ, AWQ, SparseGPT and Wanda are calibrated on verses disjoint from the evaluated
ones (padding excluded from the statistics).

Then a 3-layer student, initialised from teacher layers 0, 2 and 4 and the embeddings
(DistilBERT's every-other-layer initialisation), is distilled on other verses with the
sentence-embedding cosine loss plus MiniLM's last-layer attention and value-relation
losses, and quantized to int8.

    python examples/minilm_compress.py [--out minilm_compress] [--steps 200] [--quick]

Writes ``results.md`` (the tables and the command), ``results.json`` and
``cosine_vs_bytes.png`` to ``--out``.

References: Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers, 2020; Sanh et al., DistilBERT, a distilled
version of BERT, 2019; Frantar et al., GPTQ, 2022; Lin et al., AWQ, 2023; Frantar &
Alistarh, SparseGPT, 2023; Sun et al., A Simple and Effective Pruning Approach for
Large Language Models (Wanda), 2023.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from minilm_pairs import PAIRS
from scipy import stats

import jaxcomp as jc
from jaxcomp.models import BertEncoder, bert_folds, load_minilm
from jaxcomp.ptq import (
    AWQConfig,
    GPTQConfig,
    SparseGPTConfig,
    WandaConfig,
    awq_model,
    compress_model,
    smoothquant_model,
)

# The 36 Dense kernels of the 6 layers; the same leaves in every row.
KERNELS = r"^layer_\d+/(attn/(query|key|value|out)|mlp/(fc|proj))/kernel$"
MAX_LENGTH = 128  # tokens; the longest verse has 81
_START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since start."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def split_verses(n_eval: int, n_calib: int, n_train: int, seed: int = 0):
    """Disjoint verse sets: evaluation (every 10th verse), calibration (offset 5), training.

    Evaluation and calibration verses are spread evenly over the whole Bible; training
    verses are drawn at random from the remaining 80%. A verse whose text also occurs
    in an earlier set (the Bible repeats some) is dropped from the later ones.
    """
    lines = [line.strip() for line in jc.data.load_text().splitlines() if line.strip()]
    evaluate = lines[0::10]
    evaluate = evaluate[:: max(1, len(evaluate) // n_eval)][:n_eval]
    held = set(evaluate)
    calib = [s for s in lines[5::10] if s not in held]
    calib = calib[:: max(1, len(calib) // n_calib)][:n_calib]
    held |= set(calib)
    train = [s for i, s in enumerate(lines) if i % 10 not in (0, 5) and s not in held]
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))[:n_train]]
    return evaluate, calib, train


def _bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def padded_batches(minilm, texts, batch_size: int, max_length: int = MAX_LENGTH, *, fixed=False):
    """Texts sorted by length in batches of ``batch_size`` rows, each padded to 16/32/64/...

    Returns ``[(rows, ids, mask)]``: the batch's positions in ``texts`` (padding rows are
    all-zero and not listed), int32 ids and mask of shape ``[batch_size, bucket]``;
    ``fixed=True`` pads every batch to the longest text (one compiled shape).
    """
    ids, mask = minilm.tokenize(texts, max_length)
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        t = _bucket(int(lengths.max() if fixed else lengths[rows].max()))
        b_ids = np.zeros((batch_size, t), np.int32)
        b_mask = np.zeros((batch_size, t), np.int32)
        width = min(t, ids.shape[1])
        b_ids[: len(rows), :width], b_mask[: len(rows), :width] = (
            ids[rows, :width],
            mask[rows, :width],
        )
        out.append((rows, b_ids, b_mask))
    return out


@functools.partial(jax.jit, static_argnames=("model", "mode"))
def _embed(model, params, ids, mask, mode=None):
    if mode is None:
        return model.apply({"params": params}, ids, mask)
    return jc.quant.quantized_apply(model, {"params": params}, ids, mask, mode=mode)


def encode(model, params, batches, n: int, mode: str | None = None) -> np.ndarray:
    """Unit-norm embeddings ``[n, d]`` of the texts in ``batches`` (their original order).

    ``mode=None`` runs float params (a dequantized tree); ``"weight_only"`` or ``"w8a8"``
    runs QArray kernels through :func:`jaxcomp.quant.quantized_apply`.
    """
    out = None
    for rows, ids, mask in batches:
        emb = np.asarray(_embed(model, params, jnp.asarray(ids), jnp.asarray(mask), mode=mode))
        if out is None:
            out = np.zeros((n, emb.shape[1]), np.float32)
        out[rows] = emb[: len(rows)]
    return out


class Evaluator:
    """Embeds the evaluation texts and scores them against the float32 teacher.

    The texts are the 2 x 48 pair sentences followed by the evaluated verses; the
    float32 teacher's embeddings of them are ``reference``.
    """

    def __init__(self, minilm, verses: list[str], batch_size: int = 64):
        self.n_pairs = len(PAIRS)
        pair_texts = [a for a, _, _ in PAIRS] + [b for _, b, _ in PAIRS]
        self.texts = pair_texts + list(verses)
        self.labels = np.array([s for _, _, s in PAIRS])
        self.batches = padded_batches(minilm, self.texts, batch_size)
        self.reference = self.embed(minilm.model, minilm.params)

    def embed(self, model, params, mode=None) -> np.ndarray:
        return encode(model, params, self.batches, len(self.texts), mode)

    def pair_cosines(self, emb: np.ndarray) -> np.ndarray:
        n = self.n_pairs
        return np.sum(emb[:n] * emb[n : 2 * n], axis=1)

    def scores(self, emb: np.ndarray) -> dict:
        cos = np.sum(emb * self.reference, axis=1)
        sims = self.pair_cosines(emb)
        return {
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "spearman_fp32": float(stats.spearmanr(sims, self.pair_cosines(self.reference))[0]),
            "spearman_labels": float(stats.spearmanr(sims, self.labels)[0]),
        }


def calibration_batches(minilm, texts, batch_size: int = 32):
    """``[(x, where)]`` for :func:`jaxcomp.ptq.compress_model` / ``awq_model`` (padding out)."""
    return [
        ({"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}, jnp.asarray(mask != 0))
        for _, ids, mask in padded_batches(minilm, texts, batch_size)
    ]


def score_row(evaluator, name: str, stored, emb: np.ndarray, seconds: float) -> dict:
    """A table row: the scores of ``emb``, the measured bytes of ``stored`` and the time taken.

    ``bytes`` counts the whole stored tree, ``layer_bytes`` the transformer layers alone
    (the 11.7M-entry word embedding stays float32 in every row).
    """
    layers = {k: v for k, v in stored.items() if k.startswith("layer_")}
    row = {
        "model": name,
        **evaluator.scores(emb),
        "bytes": jc.rules.tree_nbytes(stored),
        "layer_bytes": jc.rules.tree_nbytes(layers),
        "seconds": seconds,
    }
    log(f"{name}: mean cosine {row['mean_cosine']:.4f}, {row['bytes']:,} bytes")
    return row


def compression_rows(minilm, evaluator, calib, *, groups, quick) -> list[dict]:
    """One row per compressed model: scores against float32 and measured bytes."""
    model, params = minilm.model, minilm.params

    def apply_fn(p, x):
        return model.apply({"params": p}, x["ids"], x["mask"])

    rows = []

    def add(name, stored, emb, seconds):
        rows.append(score_row(evaluator, name, stored, emb, seconds))

    add("float32", params, evaluator.reference, 0.0)

    t = time.perf_counter()
    q8 = jc.quant.quantize_tree(params, [(KERNELS, jc.quant.QuantConfig(bits=8))], default=None)
    seconds = time.perf_counter() - t
    add("int8 per channel, weight-only", q8, evaluator.embed(model, q8, "weight_only"), seconds)
    add("int8 per channel, W8A8", q8, evaluator.embed(model, q8, "w8a8"), seconds)
    if not quick:
        t = time.perf_counter()
        smooth = smoothquant_model(apply_fn, params, calib, folds=bert_folds(minilm.config))
        sq8 = jc.quant.quantize_tree(
            smooth, [(KERNELS, jc.quant.QuantConfig(bits=8))], default=None
        )
        seconds = time.perf_counter() - t
        add("int8 W8A8, SmoothQuant", sq8, evaluator.embed(model, sq8, "w8a8"), seconds)

    for g in groups:
        t = time.perf_counter()
        rtn = jc.quant.quantize_tree(
            params, [(KERNELS, jc.quant.QuantConfig(bits=4, group_size=g))], default=None
        )
        seconds = time.perf_counter() - t
        add(f"int4 g{g}, RTN", rtn, evaluator.embed(model, jc.quant.dequantize_tree(rtn)), seconds)
        t = time.perf_counter()
        gptq, _ = compress_model(
            apply_fn,
            params,
            calib,
            rules=[(KERNELS, GPTQConfig(bits=4, group_size=g))],
            default=None,
        )
        seconds = time.perf_counter() - t
        add(
            f"int4 g{g}, GPTQ",
            gptq,
            evaluator.embed(model, jc.quant.dequantize_tree(gptq)),
            seconds,
        )
        t = time.perf_counter()
        awq = awq_model(
            apply_fn,
            params,
            calib,
            folds=bert_folds(minilm.config),
            rules=[(KERNELS, AWQConfig(bits=4, group_size=g))],
            default=None,
        )
        seconds = time.perf_counter() - t
        add(f"int4 g{g}, AWQ", awq, evaluator.embed(model, jc.quant.dequantize_tree(awq)), seconds)

    if not quick:
        t = time.perf_counter()
        sgpt, masks = compress_model(
            apply_fn, params, calib, rules=[(KERNELS, SparseGPTConfig(pattern="2:4"))], default=None
        )
        seconds = time.perf_counter() - t
        packed = jc.sparsity.compress_tree(sgpt, masks, format="2:4")
        add("2:4, SparseGPT", packed, evaluator.embed(model, sgpt), seconds)

    t = time.perf_counter()
    masks = jc.sparsity.compute_masks(params, pattern="2:4", rules=[(KERNELS, 0.5)])
    mag = jc.sparsity.apply_masks(params, masks)
    seconds = time.perf_counter() - t
    packed = jc.sparsity.compress_tree(mag, masks, format="2:4")
    add("2:4, magnitude", packed, evaluator.embed(model, mag), seconds)

    if not quick:
        t = time.perf_counter()
        wanda, masks = compress_model(
            apply_fn, params, calib, rules=[(KERNELS, WandaConfig(sparsity=0.5))], default=None
        )
        seconds = time.perf_counter() - t
        packed = jc.sparsity.compress_tree(wanda, masks, format="bitmask")
        add("Wanda 50%", packed, evaluator.embed(model, wanda), seconds)
    return rows


def student_from_teacher(teacher_params, layers=(0, 2, 4)) -> dict:
    """A shallower student's params: the embeddings and the teacher layers ``layers``."""
    params = {"embeddings": teacher_params["embeddings"]}
    for i, j in enumerate(layers):
        params[f"layer_{i}"] = teacher_params[f"layer_{j}"]
    return params


def distill(
    minilm, student_model, student_params, texts, *, steps, batch_size, lr, max_length, seed=0
):
    """Distils the student on ``texts``: embedding cosine + MiniLM attention and value losses.

    Batches are drawn at random from ``texts`` (truncated to ``max_length`` tokens).

    Returns the student params and the per-step losses ``[steps, 3]`` (cosine, attention,
    value relation).
    """
    teacher, n_t = minilm.model, minilm.config.n_layers
    n_s = student_model.config.n_layers
    last_t, last_s = f"layer_{n_t - 1}/attn/", f"layer_{n_s - 1}/attn/"
    batches = padded_batches(minilm, texts, batch_size, max_length, fixed=True)
    tx = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps), weight_decay=0.01
    )
    state = tx.init(student_params)

    @jax.jit
    def step(params, state, teacher_params, ids, mask):
        where = mask != 0
        t_emb, t_feats = jc.distill.capture_linen(
            teacher.apply, {"params": teacher_params}, ids, mask
        )

        def loss_fn(p):
            s_emb, s_feats = jc.distill.capture_linen(student_model.apply, {"params": p}, ids, mask)
            keep = where.any(axis=1)  # all-padding rows of the last batch
            losses = jnp.stack(
                [
                    jc.distill.cosine_embedding_loss(s_emb, t_emb, where=keep),
                    jc.distill.minilm_attention_loss(
                        s_feats[last_s + "attn_probs"], t_feats[last_t + "attn_probs"], where=where
                    ),
                    jc.distill.minilm_value_loss(
                        s_feats[last_s + "values"], t_feats[last_t + "values"], where=where
                    ),
                ]
            )
            return losses.sum(), losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, losses

    rng = np.random.default_rng(seed)
    history = []
    params = student_params
    for i in range(steps):
        if i % len(batches) == 0:
            order = rng.permutation(len(batches))
        _, ids, mask = batches[order[i % len(batches)]]
        params, state, losses = step(
            params, state, minilm.params, jnp.asarray(ids), jnp.asarray(mask)
        )
        history.append(np.asarray(losses))
    return params, np.array(history).reshape(-1, 3)


def distillation_rows(
    minilm, evaluator, texts, *, steps, batch_size, lr, max_length
) -> tuple[list, dict]:
    """Student rows (before, after, after + int8) scored against the float32 teacher."""
    student_model = BertEncoder(dataclasses.replace(minilm.config, n_layers=3))
    before = student_from_teacher(minilm.params)
    rows = []

    def add(name, stored, emb, seconds):
        rows.append(score_row(evaluator, name, stored, emb, seconds))

    add("student 3L (teacher layers 0,2,4)", before, evaluator.embed(student_model, before), 0.0)
    log(f"distilling: {steps} steps of {batch_size} verses")
    t = time.perf_counter()
    with jax.numpy_dtype_promotion("standard"):  # optax's adam under strict promotion
        after, history = distill(
            minilm,
            student_model,
            before,
            texts,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            max_length=max_length,
        )
    seconds = time.perf_counter() - t
    add("student 3L, distilled", after, evaluator.embed(student_model, after), seconds)
    q8 = jc.quant.quantize_tree(after, [(KERNELS, jc.quant.QuantConfig(bits=8))], default=None)
    add(
        "student 3L, distilled, int8 weight-only",
        q8,
        evaluator.embed(student_model, q8, "weight_only"),
        0.0,
    )
    k = max(1, len(history) // 10)
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "train_verses": len(texts),
        "loss_first": history[:k].mean(0).tolist(),
        "loss_last": history[-k:].mean(0).tolist(),
    }
    return rows, info


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Mean cosine to float32 against the layers' bytes, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    markers = "osD^vP*Xh<>p"
    for i, row in enumerate(rows):
        ax.plot(
            row["layer_bytes"] / 2**20,
            row["mean_cosine"],
            markers[i % len(markers)],
            markersize=7,
            label=row["model"],
        )
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([4, 6, 10, 20, 40])
    ax.set_xlabel("bytes of the transformer layers (MiB, log scale; embeddings stay float32)")
    ax.set_ylabel("mean cosine to float32 embedding")
    ax.set_title("all-MiniLM-L6-v2 on KJV verses and sentence pairs")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


COLUMNS = [
    "model",
    "mean_cosine",
    "min_cosine",
    "spearman_fp32",
    "spearman_labels",
    "bytes",
    "layer_bytes",
    "seconds",
]


def main(out: pathlib.Path, *, quick: bool, steps: int, n_eval: int, n_calib: int) -> dict:
    start = time.perf_counter()
    minilm = load_minilm()
    batch_size, max_length = (8, 32) if quick else (16, 64)
    verses, calib_texts, train_texts = split_verses(n_eval, n_calib, steps * batch_size)
    # quick: every text in one batch, so each kind of params compiles once
    evaluator = Evaluator(minilm, verses, batch_size=128 if quick else 64)
    log(f"float32 embeddings of {len(evaluator.texts)} texts")
    calib = calibration_batches(minilm, calib_texts)
    groups = (64,) if quick else (32, 64, 128)
    rows = compression_rows(minilm, evaluator, calib, groups=groups, quick=quick)
    student, info = distillation_rows(
        minilm,
        evaluator,
        train_texts,
        steps=steps,
        batch_size=batch_size,
        lr=3e-4,
        max_length=max_length,
    )
    result = {
        "compression": rows,
        "distillation": student,
        "distillation_setup": info,
        "evaluated": {"verses": len(verses), "pairs": len(PAIRS)},
        "calibration_verses": len(calib_texts),
        "total_seconds": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    jc.report.write_json(out / "results.json", result)
    plot(rows + student, out / "cosine_vs_bytes.png")
    command = "python examples/minilm_compress.py " + " ".join(sys.argv[1:])
    md = [
        "# all-MiniLM-L6-v2: compression and distillation",
        "",
        f"`{command.strip()}` ({result['total_seconds']:.0f} s). Evaluated on "
        f"{len(verses)} KJV verses and {len(PAIRS)} sentence pairs; calibrated on "
        f"{len(calib_texts)} other verses. Cosine: compressed vs float32 embedding of the "
        "same text. Spearman: pair similarities vs float32's / vs the hand scores. "
        "Bytes: measured, whole model / the 6 layers.",
        "",
        jc.report.format_table(rows, COLUMNS, markdown=True),
        "",
        f"Student: 3 layers from teacher layers 0, 2, 4; {steps} steps of {batch_size} "
        f"verses, AdamW lr {info['lr']}; losses (cosine, attention KL, value KL) "
        f"{np.round(info['loss_first'], 4).tolist()} -> "
        f"{np.round(info['loss_last'], 4).tolist()}. Cosine is to the 6-layer float32 teacher.",
        "",
        jc.report.format_table(student, COLUMNS, markdown=True),
        "",
        "![mean cosine against bytes](cosine_vs_bytes.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("minilm_compress"))
    parser.add_argument("--steps", type=int, default=None, help="distillation steps")
    parser.add_argument("--eval", type=int, default=None, help="evaluated verses")
    parser.add_argument("--calib", type=int, default=None, help="calibration verses")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer texts and steps; int8, int4 g64 and magnitude 2:4 only",
    )
    args = parser.parse_args()
    defaults = (20, 16, 32) if args.quick else (200, 256, 128)
    steps, n_eval, n_calib = (
        d if a is None else a
        for a, d in zip((args.steps, args.eval, args.calib), defaults, strict=True)
    )
    result = main(args.out, quick=args.quick, steps=steps, n_eval=n_eval, n_calib=n_calib)
    print()
    print(jc.report.format_table(result["compression"], COLUMNS, markdown=True))
    print()
    print(jc.report.format_table(result["distillation"], COLUMNS, markdown=True))
