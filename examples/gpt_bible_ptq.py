"""A small GPT trained on the King James Bible, then every post-training compression.

A byte-level BPE vocabulary (``tokenizers``) is fitted on the first 95% of the
text (cut at a line end); the last 5% is the held-out split, never seen by the
tokenizer, the training or the calibration. A GPT (pre-LayerNorm, learned
positions, untied ``lm_head``) is trained with AdamW on the training split and
cached in ``--out`` (a rerun with the same settings skips training). Then each
row compresses the fp32 model and measures its perplexity on the same held-out
tokens, and the measured bytes of its params:

- fp32;
- weight-only int4 and int3, symmetric, one scale per 128 input rows (group 128):
  round to nearest (``quantize_tree``), AWQ (``awq_model``) and GPTQ
  (``compress_model``, act-order);
- W8A8 (int8 per-channel weights, int8 per-token activations, ``quantized_apply``
  mode ``"w8a8"``), without and with SmoothQuant (alpha 0.5);
- pruning at 50% unstructured and 2:4: magnitude, Wanda, SparseGPT;
- SparseGPT 2:4 jointly quantized to int4 group 128 (GPTQ's update);
- the SparseGPT 2:4 model fine-tuned by distillation (forward KL to the dense fp32
  teacher's logits on training text; every param is fine-tuned, the pruned weights
  held at 0 by ``keep_masks``).

Every row compresses the Dense kernels of the transformer blocks
(``block_i/attn/{query,key,value,out}``, ``block_i/mlp/{fc,proj}``); token and
position embeddings, LayerNorms, biases and ``lm_head`` stay fp32 in every row.
Calibration: random training-split windows. The table (``table.md``) and
``results.json`` are written to ``--out`` when the run has finished.

    python examples/gpt_bible_ptq.py [--quick] [--out example_out/gpt_bible_ptq] [--steps N]
        [--seed S]

References: Frantar et al., GPTQ, 2022; Lin et al., AWQ, 2023; Xiao et al.,
SmoothQuant, 2022; Frantar & Alistarh, SparseGPT, 2023; Sun et al., A Simple and
Effective Pruning Approach for Large Language Models (Wanda), 2023; Hinton et al.,
Distilling the Knowledge in a Neural Network, 2015.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcomp as jc
from jaxcomp.models import GPT, GPTConfig, gpt_folds
from jaxcomp.ptq import (
    AWQConfig,
    GPTQConfig,
    SparseGPTConfig,
    WandaConfig,
    awq_model,
    compress_model,
    smoothquant_model,
)
from jaxcomp.rules import tree_nbytes

KEEP_FLOAT = [(r"^lm_head/", None)]  # every rule below: block kernels only (embeddings by default)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run (``FULL`` or ``QUICK``)."""

    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    group_size: int
    calib_seqs: int
    distill_steps: int
    distill_lr: float
    eval_windows: int | None  # None: every window of the held-out split
    text_chars: int | None  # None: the whole Bible
    ptq_mode: str = "parallel"  # compress_model's mode for GPTQ, Wanda, SparseGPT
    holdout: float = 0.05


FULL = Settings(2048, 128, 4, 4, 512, 128, 32, 400, 3e-3, 128, 128, 200, 5e-4, None, None)
QUICK = Settings(512, 32, 2, 2, 128, 32, 16, 60, 1e-2, 32, 32, 10, 5e-4, 64, 200_000)
# the fields that decide the trained fp32 params (the cache key in --out)
TRAIN_FIELDS = (
    "vocab_size", "d_model", "n_layer", "n_head", "d_ff", "seq_len", "batch_size", "steps", "lr",
    "text_chars", "holdout",
)  # fmt: skip


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- data


def load_split_text(s: Settings) -> tuple[str, str]:
    """``(training text, held-out text)``: the held-out part is the tail, cut at a line end."""
    text = jc.data.load_text()
    if s.text_chars is not None:
        text = text[: s.text_chars]
    cut = text.rfind("\n", 0, round(len(text) * (1 - s.holdout))) + 1
    return text[:cut], text[cut:]


def tokenizer_for(s: Settings, train_text: str, cache: Path | None):
    """The BPE tokenizer fitted on the training text only (read back from ``cache`` if there)."""
    if cache is not None and cache.exists():
        from tokenizers import Tokenizer

        return jc.data.BPETokenizer(Tokenizer.from_file(str(cache)))
    return jc.data.train_bpe(train_text, s.vocab_size)


def eval_windows(test_ids: np.ndarray, s: Settings) -> np.ndarray:
    """``[W, T + 1]`` consecutive held-out windows: every token but the first is a target once."""
    n = (len(test_ids) - 1) // s.seq_len
    windows = next(jc.data.lm_batches(test_ids, n, s.seq_len, seed=0, shuffle=False))
    return windows if s.eval_windows is None else windows[: s.eval_windows]


def calibration_batches(train_ids: np.ndarray, s: Settings, seed: int) -> list[np.ndarray]:
    """``calib_seqs`` random training windows ``[T]``, in batches of at most 32."""
    rng = np.random.default_rng((seed, 1))
    starts = rng.integers(0, len(train_ids) - s.seq_len, s.calib_seqs)
    x = train_ids[starts[:, None] + np.arange(s.seq_len)].astype(np.int32)
    return [x[i : i + 32] for i in range(0, len(x), 32)]


def unigram_perplexity(train_ids: np.ndarray, test_ids: np.ndarray, vocab: int) -> float:
    """Held-out perplexity of add-one-smoothed training token frequencies (the floor to beat)."""
    p = (np.bincount(train_ids, minlength=vocab) + 1.0) / (len(train_ids) + vocab)
    return float(np.exp(-np.mean(np.log(p[test_ids[1:]]))))


# ---------------------------------------------------------------- training


def _lm_loss(model, params, w):
    logits = model.apply({"params": params}, w[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()


def train(model, s: Settings, train_ids: np.ndarray, seed: int) -> dict:
    """AdamW (warm-up, cosine decay, clipping at norm 1) for ``s.steps`` steps of ``[B, T]``."""
    params = model.init(jax.random.key(seed), jnp.zeros((1, s.seq_len), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.lr, max(1, s.steps // 20), s.steps, s.lr / 10
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = tx.init(params)

    @jax.jit
    def step(params, state, w):
        loss, grads = jax.value_and_grad(lambda p: _lm_loss(model, p, w))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    done, epoch, start = 0, 0, time.perf_counter()
    every = max(1, s.steps // 10)
    while done < s.steps:
        for w in jc.data.lm_batches(train_ids, s.batch_size, s.seq_len, seed=seed, epoch=epoch):
            params, state, loss = step(params, state, w)
            done += 1
            if done % every == 0 or done == s.steps:
                _log(
                    f"  train step {done}/{s.steps}: loss {float(loss):.3f} "
                    f"({time.perf_counter() - start:.0f}s)"
                )
            if done == s.steps:
                break
        epoch += 1
    return params


def distill(model, teacher, student, masks, s: Settings, train_ids: np.ndarray, seed: int):
    """``s.distill_steps`` Adam steps of forward KL(teacher || student); pruned weights stay 0."""
    schedule = optax.cosine_decay_schedule(s.distill_lr, s.distill_steps)
    tx = optax.chain(optax.adam(schedule), jc.sparsity.keep_masks(masks))
    state = tx.init(student)

    @jax.jit
    def step(student, state, w):
        x = w[:, :-1]
        t_logits = model.apply({"params": teacher}, x)

        def loss(p):
            return jc.distill.kl_div(model.apply({"params": p}, x), t_logits)

        value, grads = jax.value_and_grad(loss)(student)
        updates, state = tx.update(grads, state, student)
        return optax.apply_updates(student, updates), state, value

    done, epoch, kls = 0, 0, []
    while done < s.distill_steps:
        for w in jc.data.lm_batches(
            train_ids, s.batch_size, s.seq_len, seed=seed + 1000, epoch=epoch
        ):
            student, state, kl = step(student, state, w)
            kls.append(float(kl))
            done += 1
            if done == 1 or done == s.distill_steps:
                _log(f"  distill step {done}/{s.distill_steps}: KL to teacher {float(kl):.4f}")
            if done == s.distill_steps:
                break
        epoch += 1
    return student, kls


def trained_params(model, s: Settings, train_ids, seed: int, out: Path, meta: dict):
    """The fp32 params: restored from ``out/fp32_params`` if trained with ``meta``, else trained."""
    path = out / "fp32_params"
    if path.exists() and jc.checkpoint.read_metadata(path)["metadata"] == meta:
        _log(f"fp32 params restored from {path} (delete it to retrain)")
        return jc.checkpoint.restore(path), 0.0
    _log(f"training for {s.steps} steps")
    start = time.perf_counter()
    params = jax.block_until_ready(train(model, s, train_ids, seed))
    seconds = time.perf_counter() - start
    jc.checkpoint.save(path, params, metadata=meta, overwrite=True)
    return params, seconds


# ---------------------------------------------------------------- evaluation


def perplexity_fn(model, windows: np.ndarray, batch_size: int):
    """``ppl(params, mode)``: held-out perplexity; ``mode`` None, ``"weight_only"`` or ``"w8a8"``.

    ``ppl = exp(-mean_t log p(x_t | x_<t))`` over every target token of ``windows``.
    """
    fns = {}

    def nll_sum(mode):
        if mode not in fns:

            def f(p, w, m):
                if mode is None:
                    logits = model.apply({"params": p}, w[:, :-1])
                else:
                    logits = jc.quant.quantized_apply(model, {"params": p}, w[:, :-1], mode=mode)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:])
                return jnp.sum(jnp.where(m[:, None], ce, 0.0))

            fns[mode] = jax.jit(f)
        return fns[mode]

    def ppl(params, mode=None):
        total, f = 0.0, nll_sum(mode)
        for i in range(0, len(windows), batch_size):
            w = windows[i : i + batch_size]
            m = np.arange(batch_size) < len(w)
            w = np.pad(w, ((0, batch_size - len(w)), (0, 0)))
            total += float(f(params, w, m))
        return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))

    return ppl


# ---------------------------------------------------------------- compression rows


def _block_kernels(tree):
    return {
        jc.rules.path_str(p): x
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jc.rules.path_str(p).startswith("block_") and jc.rules.path_str(p).endswith("kernel")
    }


def _joint_qarrays(params, sparse, bits: int, group_size: int):
    """The int``bits`` QArray tree holding SparseGPT's jointly quantized kernels exactly.

    SparseGPT's grid is :func:`jaxcomp.quant.quantize`'s on the original kernel, so
    the kept weights are integer multiples of those scales.
    """
    originals = _block_kernels(params)

    def one(path, leaf):
        name = jc.rules.path_str(path)
        if name not in originals:
            return leaf
        ref = jc.quant.quantize(originals[name], bits, group_size=group_size)
        k, n = leaf.shape
        values = jnp.round(leaf.reshape(ref.scale.shape[0], -1, n) / ref.scale[:, None])
        q = jc.quant.QArray.from_grid(
            values.reshape(k, n),
            ref.scale,
            bits=bits,
            shape=ref.shape,
            dtype=ref.dtype,
            channel_axis=ref.channel_axis,
            group_size=ref.group_size,
        )
        if not np.allclose(q.dequantize(), leaf, rtol=0, atol=1e-6):
            raise AssertionError(f"{name}: SparseGPT's int{bits} values are not on the grid")
        return q

    return jax.tree_util.tree_map_with_path(one, sparse)


def compression_rows(model, params, calib, s: Settings):
    """Yields ``(name, params for evaluation, eval mode, stored tree, masks, pattern)`` per row."""
    g = s.group_size
    cfg = model.config
    folds = [f for f in gpt_folds(cfg) if not f.layers[0].startswith("lm_head")]
    for bits in (4, 3):
        label = f"int{bits} g{g}"
        rtn = jc.quant.quantize_tree(
            params, KEEP_FLOAT, default=jc.quant.QuantConfig(bits=bits, group_size=g)
        )
        yield f"{label} RTN", rtn, "weight_only", rtn, None, None
        awq = awq_model(
            model,
            params,
            calib,
            folds=folds,
            rules=KEEP_FLOAT,
            default=AWQConfig(bits=bits, group_size=g),
        )
        yield f"{label} AWQ", awq, "weight_only", awq, None, None
        gptq, _ = compress_model(
            model,
            params,
            calib,
            rules=KEEP_FLOAT,
            default=GPTQConfig(bits=bits, group_size=g, act_order=True),
            mode=s.ptq_mode,
        )
        yield f"{label} GPTQ", gptq, "weight_only", gptq, None, None
    int8 = jc.quant.QuantConfig(bits=8)
    w8 = jc.quant.quantize_tree(params, KEEP_FLOAT, default=int8)
    yield "W8A8", w8, "w8a8", w8, None, None
    smoothed = smoothquant_model(model, params, calib, folds=folds, alpha=0.5)
    sq = jc.quant.quantize_tree(smoothed, KEEP_FLOAT, default=int8)
    yield "W8A8 SmoothQuant a=0.5", sq, "w8a8", sq, None, None
    for pattern, label in (("unstructured", "50%"), ("2:4", "2:4")):
        fmt = "bitmask" if pattern == "unstructured" else "2:4"
        masks = jc.sparsity.compute_masks(params, sparsity=0.5, pattern=pattern, rules=KEEP_FLOAT)
        pruned = jc.sparsity.apply_masks(params, masks)
        yield f"{label} magnitude", pruned, None, (pruned, masks, fmt), masks, pattern
        for name, config in (
            ("Wanda", WandaConfig(sparsity=0.5, pattern=pattern)),
            ("SparseGPT", SparseGPTConfig(sparsity=0.5, pattern=pattern)),
        ):
            pruned, masks = compress_model(
                model, params, calib, rules=KEEP_FLOAT, default=config, mode=s.ptq_mode
            )
            yield f"{label} {name}", pruned, None, (pruned, masks, fmt), masks, pattern
    joint, masks = compress_model(
        model,
        params,
        calib,
        rules=KEEP_FLOAT,
        default=SparseGPTConfig(pattern="2:4", bits=4, group_size=g),
        mode=s.ptq_mode,
    )
    stored = _joint_qarrays(params, joint, 4, g)
    yield f"2:4 SparseGPT + int4 g{g}", joint, None, stored, masks, "2:4"


def _stored_bytes(stored) -> int:
    if isinstance(stored, tuple):
        tree, masks, fmt = stored
        return tree_nbytes(jc.sparsity.compress_tree(tree, masks, format=fmt))
    return tree_nbytes(stored)


# ---------------------------------------------------------------- driver


def run(s: Settings, out: Path, seed: int = 0) -> dict:
    """Trains (or restores) the GPT, builds every row, writes ``table.md`` and ``results.json``.

    Returns:
      ``{"rows": [...], "trees": {name: params}, "masks": {name: masks}, ...}``.
    """
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_text, test_text = load_split_text(s)
    tok_cache = out / "tokenizer.json"
    meta = {"training": {k: getattr(s, k) for k in TRAIN_FIELDS}, "seed": seed}
    ckpt = out / "fp32_params"
    cached = ckpt.exists() and jc.checkpoint.read_metadata(ckpt)["metadata"] == meta
    tok = tokenizer_for(s, train_text, tok_cache if cached else None)
    train_ids, test_ids = tok.encode(train_text), tok.encode(test_text)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        max_len=s.seq_len,
        n_layer=s.n_layer,
        n_head=s.n_head,
        d_model=s.d_model,
        d_ff=s.d_ff,
    )
    description = (
        f"GPT d_model {s.d_model}, {s.n_layer} layers, {s.n_head} heads, d_ff {s.d_ff}, "
        f"context {s.seq_len}, BPE vocab {tok.vocab_size}"
    )
    model = GPT(config)
    params, train_seconds = trained_params(model, s, train_ids, seed, out, meta)
    if train_seconds:
        tok.tokenizer.save(str(tok_cache))
    windows = eval_windows(test_ids, s)
    ppl = perplexity_fn(model, windows, 32)
    calib = calibration_batches(train_ids, s, seed)
    unigram = unigram_perplexity(train_ids, test_ids, tok.vocab_size)
    _log(
        f"{len(train_ids):,} training tokens, {windows.shape[0] * s.seq_len:,} held-out tokens "
        f"(unigram perplexity {unigram:.1f}), {s.calib_seqs} calibration sequences"
    )

    rows, trees, all_masks = [], {}, {}

    def add(name, p, mode, stored, masks, seconds):
        value = ppl(p, mode)
        row = {
            "model": name,
            "held-out ppl": value,
            "vs fp32": value / rows[0]["held-out ppl"] if rows else 1.0,
            "bytes": _stored_bytes(stored),
            "compress s": seconds,
        }
        rows.append(row)
        trees[name], all_masks[name] = p, masks
        _log(f"  {name:32s} ppl {value:9.2f}  {row['bytes']:>10,} bytes  ({seconds:.1f}s)")

    _log("rows:")
    add("fp32", params, None, params, None, 0.0)
    start = time.perf_counter()
    for name, p, mode, stored, masks, _ in compression_rows(model, params, calib, s):
        add(name, p, mode, stored, masks, time.perf_counter() - start)
        start = time.perf_counter()
    sparse_name = "2:4 SparseGPT"
    start = time.perf_counter()
    recovered, kls = distill(
        model, params, trees[sparse_name], all_masks[sparse_name], s, train_ids, seed
    )
    add(
        f"2:4 SparseGPT + distill {s.distill_steps} steps",
        recovered,
        None,
        (recovered, all_masks[sparse_name], "2:4"),
        all_masks[sparse_name],
        time.perf_counter() - start,
    )

    total = time.perf_counter() - t0
    results = {
        "settings": dataclasses.asdict(s),
        "seed": seed,
        "model": description,
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(windows.shape[0] * s.seq_len),
        "unigram_ppl": unigram,
        "train_seconds": train_seconds,
        "total_seconds": total,
        "ptq_mode": s.ptq_mode,
        "distill_kl_first_last": [kls[0], kls[-1]],
        "rows": rows,
    }
    table = jc.report.format_table(
        [
            {
                "model": r["model"],
                "held-out ppl": f"{r['held-out ppl']:.2f}",
                "vs fp32": f"{r['vs fp32']:.3f}",
                "bytes": r["bytes"],
                "compress s": f"{r['compress s']:.1f}",
            }
            for r in rows
        ],
        markdown=True,
    )
    notes = (
        f"{description}; {s.steps} training steps of {s.batch_size}x{s.seq_len} tokens "
        f"(seed {seed}). Held-out perplexity on the last {s.holdout:.0%} of the King James "
        f"Bible ({results['heldout_tokens']:,} tokens; unigram baseline {unigram:.1f}). "
        f"Compressed: the Dense kernels of the blocks (attn query/key/value/out, mlp fc/proj); "
        f"embeddings, LayerNorms, biases and lm_head stay fp32 in every row (the distillation "
        f"row fine-tunes all params, pruned weights held at 0). Quantization is "
        f"symmetric with one scale per {s.group_size} input rows (int3 too); GPTQ with "
        f"act-order; W8A8 = int8 per-channel weights and int8 per-token activations. "
        f"GPTQ, Wanda, SparseGPT: compress_model mode={s.ptq_mode!r} (every layer from the "
        f"fp32 model's inputs); calibration {s.calib_seqs} training sequences. "
        f"Bytes are measured: packed QArrays, bitmask (50%) or N:M (2:4) compact sparse "
        f"storage; the 2:4 + int4 row is stored as dense packed int4 codes."
    )
    _write(out, table, notes, results)
    _log(f"\n{notes}\n\n{table}\n\n({total:.0f}s in all)")
    return {**results, "trees": trees, "masks": all_masks, "params": params}


def _write(out: Path, table: str, notes: str, results: dict) -> None:
    """Writes ``table.md`` and ``results.json`` in a staging folder, then moves them in place."""
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        (stage / "table.md").write_text(f"{notes}\n\n{table}\n", encoding="utf-8")
        (stage / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        for item in stage.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and text, for tests")
    parser.add_argument("--out", default="example_out/gpt_bible_ptq")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps)
    return run(s, Path(args.out), args.seed)


if __name__ == "__main__":
    main()
