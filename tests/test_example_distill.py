"""examples/distill_fashion_mnist.py and distill_lm_bible.py run end to end in --quick mode."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from jaxcomp.data import FASHION_MNIST_DIR
from tests.conftest import require_data

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def _table_names(stdout: str) -> list[str]:
    """First cells of the Markdown table's body rows."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [line.strip("|").split("|")[0].strip() for line in lines[1:]]


def test_fashion_mnist_distillation_quick(tmp_path):
    present = os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
    require_data(present, f"Fashion-MNIST is not in {FASHION_MNIST_DIR}")
    out = tmp_path / "fm"
    result = _run("distill_fashion_mnist.py", "--seeds", "0", "1", "--out", str(out))
    payload = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().strip() in result.stdout
    names = [row["model"] for row in payload["rows"]]
    assert len(names) == 3 and names == _table_names(result.stdout)
    assert names[0].startswith("teacher") and "labels only" in names[1] and "distilled" in names[2]
    assert [r["seed"] for r in payload["per_seed"]] == [0, 1]
    for row in payload["rows"]:
        accs = [row["seed 0"], row["seed 1"]]
        # 10 classes: even 2 epochs on 8192 images are far above chance (0.1)
        assert all(0.5 < a <= 1.0 for a in accs), row
        assert math.isclose(row["mean"], sum(accs) / 2, rel_tol=1e-9)
        assert math.isclose(row["std"], abs(accs[0] - accs[1]) / math.sqrt(2), rel_tol=1e-6)
    for seed in payload["per_seed"]:
        for model, losses in seed["losses"].items():
            assert all(math.isfinite(x) for x in losses), model
            assert losses[-1] < losses[0], (model, losses)  # every model trains
    assert payload["settings"]["temperature"] == 20.0


def test_lm_distillation_quick_and_teacher_cache(tmp_path):
    require_data(shutil.which("bible") is not None, "bible-kjv is not installed")
    out = tmp_path / "lm"
    first = _run("distill_lm_bible.py", "--out", str(out))
    payload = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().strip() in first.stdout
    assert not payload["teacher_cached"] and (out / "teacher").is_dir()
    rows = {row["model"]: row for row in payload["rows"]}
    assert list(rows) == _table_names(first.stdout)
    kinds = ["teacher", "labels only", "forward KL", "reverse KL", "generalized JSD"]
    assert len(rows) == len(kinds)
    assert all(k in name for k, name in zip(kinds, rows, strict=True))
    teacher, *students = rows.values()
    vocab = 63  # the Bible's characters (jaxcomp.data.load_corpus)
    # the teacher against itself: no divergence
    assert (
        abs(teacher["KL(teacher, student)"]) < 1e-6 and abs(teacher["KL(student, teacher)"]) < 1e-6
    )
    for row in rows.values():
        # a trained model beats the uniform guess (perplexity = vocabulary size)
        assert 1.0 < row["perplexity"] < vocab, row
    for row in students:
        assert row["params"] < teacher["params"]
        assert 0.0 < row["KL(teacher, student)"] < math.log(vocab), row
        assert 0.0 < row["KL(student, teacher)"] < math.log(vocab), row
    for name, losses in payload["training_losses"].items():
        assert all(math.isfinite(x) for x in losses), name
        assert losses[-1] < losses[0], (name, losses)

    # a rerun with the same settings restores the cached teacher: same teacher row
    second = _run("distill_lm_bible.py", "--out", str(out), "--steps", "1", "--methods", "ce")
    again = json.loads((out / "results.json").read_text())
    assert again["teacher_cached"] and "restored from cache" in second.stdout
    assert again["rows"][0] == payload["rows"][0] and len(again["rows"]) == 2
