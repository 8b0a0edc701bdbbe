"""`jaxcomp demo`: train, distill, prune, quantize, save and evaluate a classifier end to end.

Stages (every one really computes):

1. train a teacher on the labels: a small CNN (on Fashion-MNIST an MLP teacher of
   Hinton's 2x1200 size trained the same way is no more accurate than the 2x800
   student, so its soft targets cannot help; the CNN is clearly better);
2. distill a 2x800 student from it (Hinton loss: soft targets at temperature T mixed
   with the labels by alpha), and train the same student on the labels alone;
3. prune the distilled student gradually (cubic schedule) to the target sparsity by
   magnitude inside the optimizer (:func:`jaxcomp.sparsity.prune`), then fine-tune
   with the masks held by :func:`jaxcomp.sparsity.keep_masks`;
4. quantize the pruned student: int8 per channel and low-bit per group;
5. save every model with orbax, restore each in a fresh process and evaluate there.
   The table's accuracies, parameter counts and bytes come from those restored
   checkpoints.

References: Hinton et al., Distilling the Knowledge in a Neural Network, 2015;
Zhu & Gupta, To prune, or not to prune, 2017.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxcomp import checkpoint, data, distill, quant, report, sparsity, train
from jaxcomp.models import CNN, HINTON_SIZES, MLP, build_model, init_params

COLUMNS = ["model", "parameters", "nonzeros", "bytes_on_disk", "bits_per_param", "test_accuracy"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (the CLI flags)."""

    data: str = "digits"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    sparsity: float = 0.9
    bits: int = 4
    out: str = "demo_out"
    quick: bool = False
    temperature: float = 4.0
    alpha: float = 0.9
    batch_size: int = 128
    learning_rate: float = 1e-3

    def stage_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        if self.quick:
            return 2
        return 40 if self.data == "digits" else 20


def validate(config: DemoConfig) -> None:
    """Raises ValueError for a bad flag before any work or any file is written."""
    if config.data not in data.NAMES and not config.data.startswith("tfds:"):
        raise ValueError(f"--data {config.data!r} is unknown; choose from {', '.join(data.NAMES)}")
    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        raise ValueError(f"--data-dir {config.data_dir!r} is not an existing folder")
    if not 0.0 <= config.sparsity < 1.0:
        raise ValueError(f"--sparsity {config.sparsity} is outside [0, 1)")
    if not 2 <= config.bits <= 8:
        raise ValueError(f"--bits {config.bits} is outside 2-8")
    if config.epochs is not None and config.epochs < 1:
        raise ValueError(f"--epochs {config.epochs} must be at least 1")
    if not config.seeds:
        raise ValueError("--seed needs at least one value")
    _check_writable(Path(config.out))


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"--out {str(out)!r} is not writable ({str(probe)!r} is not a writable folder)"
        )


# ----------------------------------------------------------------------------- training


def _classifier_loss(model: nn.Module, teacher: bool, temperature: float, alpha: float) -> Callable:
    def loss_fn(params, batch, key):
        logits = model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": key})
        if teacher:
            loss = distill.hinton_loss(
                logits, batch["t"], batch["y"], temperature=temperature, alpha=alpha
            )
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {}

    return loss_fn


def _fit(
    step: Callable,
    params: Any,
    opt_state: Any,
    arrays: dict[str, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    mesh,
    desc: str,
) -> tuple[Any, Any]:
    key = jax.random.key(seed)
    progress = tqdm(
        range(epochs), desc=desc, unit="epoch", leave=False, file=sys.stderr, disable=None
    )  # bars on a terminal only; one summary line per stage always
    start = time.perf_counter()
    loss = float("nan")
    for epoch in progress:
        losses = []
        for batch in train.batch_iterator(arrays, batch_size, seed=seed, epoch=epoch):
            key, sub = jax.random.split(key)
            params, opt_state, metrics = step(
                params, opt_state, train.shard_batch(batch, mesh), sub
            )
            losses.append(metrics["loss"])
        loss = float(jnp.mean(jnp.stack(losses)))
        progress.set_postfix(loss=f"{loss:.4f}")
    print(
        f"{desc}: {epochs} epochs in {time.perf_counter() - start:.1f}s, "
        f"last epoch loss {loss:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return params, opt_state


def _train(model, params, arrays, tx, *, loss_fn, epochs, config, seed, mesh, desc):
    params = train.replicate(jax.device_get(params), mesh)  # a fresh copy: the step donates it
    opt_state = train.replicate(tx.init(params), mesh)
    step = train.make_train_step(loss_fn, tx, mesh=mesh)
    return _fit(
        step,
        params,
        opt_state,
        arrays,
        epochs=epochs,
        batch_size=config.batch_size,
        seed=seed,
        mesh=mesh,
        desc=desc,
    )


def _group_rules(params: Any, bits: int, target: int = 128) -> list[tuple[str, quant.QuantConfig]]:
    """One rule per kernel: groups of the largest divisor of its input size up to ``target``."""
    rules = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(k.key) for k in path)
        if name.endswith("kernel"):
            n_in = int(np.prod(leaf.shape[:-1]))
            group = max(g for g in range(1, min(target, n_in) + 1) if n_in % g == 0)
            rules.append((f"^{name}$", quant.QuantConfig(bits=bits, group_size=group)))
    return rules


def _run_seed(config: DemoConfig, seed: int, stage_dir: Path, timings: dict) -> list[tuple]:
    """Trains and compresses for one seed; returns ``(name, checkpoint_path)`` pairs."""
    ds = data.load(config.data, data_dir=config.data_dir, seed=seed)
    mesh = train.data_mesh()
    n_dev = mesh.devices.size
    config = dataclasses.replace(config, batch_size=max(n_dev, config.batch_size // n_dev * n_dev))
    epochs = config.stage_epochs()
    arrays = {"x": ds.train.x, "y": ds.train.y}
    lr = config.learning_rate
    steps_per_epoch = len(ds.train.x) // config.batch_size

    def adam(peak, stage_epochs=epochs):
        return optax.adam(optax.cosine_decay_schedule(peak, stage_epochs * steps_per_epoch))

    def timed(stage, fn):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        timings.setdefault(stage, []).append(time.perf_counter() - start)
        return result

    def model_of(sizes, dropout=0.0):
        return MLP(features=sizes, num_classes=ds.num_classes, dropout_rate=dropout)

    teacher = CNN(num_classes=ds.num_classes)
    teacher_epochs = max(1, epochs // 2)
    t_params, _ = timed(
        "train teacher",
        lambda: _train(
            teacher,
            init_params(teacher, ds.input_shape, seed),
            arrays,
            adam(lr, teacher_epochs),
            loss_fn=_classifier_loss(teacher, False, 1.0, 0.0),
            epochs=teacher_epochs,
            config=config,
            seed=seed,
            mesh=mesh,
            desc=f"seed {seed}: teacher",
        ),
    )
    teacher_logits = train.predict(
        lambda p, x: teacher.apply({"params": p}, x), t_params, ds.train.x
    )

    student = model_of(HINTON_SIZES["student"])
    s_init = init_params(student, ds.input_shape, seed + 1)
    distilled, _ = timed(
        "distill student",
        lambda: _train(
            student,
            s_init,
            {**arrays, "t": teacher_logits},
            adam(lr),
            loss_fn=_classifier_loss(student, True, config.temperature, config.alpha),
            epochs=epochs,
            config=config,
            seed=seed,
            mesh=mesh,
            desc=f"seed {seed}: distill",
        ),
    )
    labels_only, _ = timed(
        "train student on labels",
        lambda: _train(
            student,
            s_init,
            arrays,
            adam(lr),
            loss_fn=_classifier_loss(student, False, 1, 0),
            epochs=epochs,
            config=config,
            seed=seed,
            mesh=mesh,
            desc=f"seed {seed}: labels only",
        ),
    )

    prune_steps = epochs * steps_per_epoch
    frequency = max(1, steps_per_epoch // 4)
    schedule = sparsity.polynomial_schedule(
        target_sparsity=config.sparsity,
        begin_step=0,
        end_step=max(1, int(0.75 * prune_steps) // frequency) * frequency,
        frequency=frequency,
    )
    distill_loss = _classifier_loss(student, True, config.temperature, config.alpha)
    distill_arrays = {**arrays, "t": teacher_logits}
    pruned, prune_state = timed(
        "prune gradually",
        lambda: _train(
            student,
            distilled,
            distill_arrays,
            sparsity.prune(adam(lr / 2), schedule=schedule),
            loss_fn=distill_loss,
            epochs=epochs,
            config=config,
            seed=seed,
            mesh=mesh,
            desc=f"seed {seed}: prune",
        ),
    )
    masks = prune_state.masks
    finetune_epochs = max(1, epochs // 4)
    finetune_tx = optax.chain(adam(lr / 4, finetune_epochs), sparsity.keep_masks(masks))
    pruned, _ = timed(
        "fine-tune pruned",
        lambda: _train(
            student,
            sparsity.apply_masks(pruned, masks),
            distill_arrays,
            finetune_tx,
            loss_fn=distill_loss,
            epochs=finetune_epochs,
            config=config,
            seed=seed,
            mesh=mesh,
            desc=f"seed {seed}: fine-tune",
        ),
    )

    bits = config.bits
    int8 = timed(
        "quantize int8", lambda: quant.quantize_tree(distilled, default=quant.QuantConfig(bits=8))
    )
    low = timed(
        f"quantize int{bits}",
        lambda: quant.quantize_tree(distilled, _group_rules(distilled, bits), default=None),
    )
    pruned_int8 = quant.quantize_tree(pruned, default=quant.QuantConfig(bits=8))
    pruned_low = quant.quantize_tree(pruned, _group_rules(pruned, bits), default=None)

    pct = round(100 * config.sparsity)
    models = [
        ("teacher CNN", teacher, t_params),
        ("student 2x800, labels only", student, labels_only),
        ("student 2x800, distilled", student, distilled),
        ("distilled + int8 per channel", student, int8),
        (f"distilled + int{bits} per group", student, low),
        (f"distilled, {pct}% sparse", student, pruned),
        (f"{pct}% sparse + int8 per channel", student, pruned_int8),
        (f"{pct}% sparse + int{bits} per group", student, pruned_low),
    ]
    saved = []
    start = time.perf_counter()
    for i, (name, model, params) in enumerate(models):
        path = stage_dir / "checkpoints" / f"seed{seed}" / f"{i}"
        model_config = _model_config(model)
        checkpoint.save(
            path,
            jax.device_get(params),
            metadata={"model": model_config, "name": name, "seed": seed},
        )
        saved.append((name, path))
    timings.setdefault("save checkpoints", []).append(time.perf_counter() - start)
    return saved


def _model_config(model: nn.Module) -> dict[str, Any]:
    """The plain-dict config stored with a checkpoint, read back by ``build_model``."""
    if isinstance(model, CNN):
        return {
            "kind": "cnn",
            "channels": list(model.channels),
            "hidden": model.hidden,
            "num_classes": model.num_classes,
        }
    return {"kind": "mlp", "features": list(model.features), "num_classes": model.num_classes}


def evaluate_checkpoints(
    paths: Sequence[str | os.PathLike], *, data_name: str, data_dir: str | None, seed: int
) -> list[dict[str, Any]]:
    """Restores each classifier checkpoint and measures it on the test split.

    Quantized leaves are dequantized on the fly inside the jitted forward pass.
    """
    ds = data.load(data_name, data_dir=data_dir, seed=seed)
    rows = []
    for path in paths:
        meta = checkpoint.read_metadata(path)
        user = meta.get("metadata", meta)
        model = build_model(user["model"])
        params = checkpoint.restore(path)

        def apply(p, x, model=model):
            return model.apply({"params": quant.dequantize_tree(p)}, x)

        n_params = report.count_params(params)
        disk = checkpoint.disk_bytes(path)
        rows.append(
            {
                "model": user.get("name", str(path)),
                "parameters": n_params,
                "nonzeros": report.count_nonzero(params),
                "bytes_on_disk": disk,
                "bits_per_param": 8 * disk / n_params,
                "test_accuracy": train.accuracy(apply, params, ds.test.x, ds.test.y),
            }
        )
    return rows


def _evaluate_in_fresh_process(config: DemoConfig, seed: int, paths: list[Path]) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "jaxcomp.cli",
        "evaluate",
        "--json",
        "--data",
        config.data,
        "--seed",
        str(seed),
    ]
    if config.data_dir:
        cmd += ["--data-dir", config.data_dir]
    cmd += [str(p) for p in paths]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"evaluation in a fresh process failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout)


def _mean_rows(per_seed: list[list[dict]]) -> list[dict]:
    rows = []
    for group in zip(*per_seed, strict=True):
        row = dict(group[0])
        for col in ("nonzeros", "bytes_on_disk", "bits_per_param", "test_accuracy"):
            values = np.array([r[col] for r in group], np.float64)
            row[col] = float(values.mean()) if col != "nonzeros" else int(round(values.mean()))
            if col == "test_accuracy" and len(group) > 1:
                row["test_accuracy_std"] = float(values.std(ddof=1))
        rows.append(row)
    return rows


def run(config: DemoConfig) -> dict[str, Any]:
    """Runs the demo, writes ``results.json``, ``results.md``, ``accuracy_vs_bytes.png``
    and the checkpoints into ``config.out``, and returns the results.

    Work happens in a hidden staging folder inside ``config.out``; only a finished
    run's files are moved into place, so a failure leaves nothing half-written.
    """
    validate(config)
    out = Path(config.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        timings: dict[str, list[float]] = {}
        per_seed = []
        for seed in config.seeds:
            saved = _run_seed(config, seed, stage_dir, timings)
            start = time.perf_counter()
            rows = _evaluate_in_fresh_process(config, seed, [p for _, p in saved])
            timings.setdefault("restore and evaluate (fresh process)", []).append(
                time.perf_counter() - start
            )
            per_seed.append(rows)
        rows = _mean_rows(per_seed)
        results = {
            "config": {**dataclasses.asdict(config), "epochs": config.stage_epochs()},
            "devices": [str(d) for d in jax.local_devices()],
            "rows": rows,
            "per_seed": {str(s): r for s, r in zip(config.seeds, per_seed, strict=True)},
            "stage_seconds": {k: float(np.mean(v)) for k, v in timings.items()},
        }
        _write_outputs(results, config, stage_dir)
        for item in stage_dir.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        return results
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def _write_outputs(results: dict, config: DemoConfig, stage_dir: Path) -> None:
    rows = results["rows"]
    seeds = ", ".join(map(str, config.seeds))
    which = f"mean of seeds {seeds}" if len(config.seeds) > 1 else f"seed {seeds}"
    title = f"jaxcomp demo on {config.data} ({which})"
    report.write_json(stage_dir / "results.json", results)
    table = report.format_table(_display_rows(rows), markdown=True)
    (stage_dir / "results.md").write_text(f"## {title}\n\n{table}\n", encoding="utf-8")
    report.plot_accuracy_vs_bytes(rows, stage_dir / "accuracy_vs_bytes.png", title=title)


def _display_rows(rows: list[dict]) -> list[dict]:
    shown = []
    for r in rows:
        acc = f"{100 * r['test_accuracy']:.2f}"
        if "test_accuracy_std" in r:
            acc += f" ± {100 * r['test_accuracy_std']:.2f}"
        shown.append(
            {
                "model": r["model"],
                "parameters": r["parameters"],
                "non-zeros": r["nonzeros"],
                "bytes on disk": int(r["bytes_on_disk"]),
                "bits/param": f"{r['bits_per_param']:.2f}",
                "test acc. (%)": acc,
            }
        )
    return shown


def format_results(results: dict) -> str:
    """The plain-text table printed at the end of a run, with stage times."""
    table = report.format_table(_display_rows(results["rows"]))
    times = "  ".join(f"{k}: {v:.1f}s" for k, v in results["stage_seconds"].items())
    return f"{table}\n\nstage times (mean per seed): {times}"
