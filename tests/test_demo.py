"""The main job end to end (small), its outputs, and its handling of bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcomp import cli, demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion clean
        status = cli.main(
            ["demo", "--quick", "--epochs", "2", "--sparsity", "0.75", "--out", str(out)]
        )
    assert status == 0
    return out, json.loads((out / "results.json").read_text())


def test_demo_writes_table_plot_and_checkpoints(demo_run):
    out, results = demo_run
    assert (out / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| model" in md and "75% sparse + int4 per group" in md
    assert len(list((out / "checkpoints" / "seed0").iterdir())) == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".partial-")]
    assert results["config"]["epochs"] == 2


def test_demo_numbers_come_from_restored_checkpoints(demo_run):
    out, results = demo_run
    rows = {r["model"]: r for r in results["rows"]}
    fp32 = rows["student 2x800, distilled"]
    # every model learned something (chance is 10%)
    assert all(r["test_accuracy"] > 0.5 for r in rows.values())
    # measured on disk, against the float32 checkpoint of the same model
    assert rows["distilled + int8 per channel"]["bytes_on_disk"] <= 0.30 * fp32["bytes_on_disk"]
    assert rows["distilled + int4 per group"]["bytes_on_disk"] <= 0.20 * fp32["bytes_on_disk"]
    assert abs(rows["distilled + int8 per channel"]["test_accuracy"] - fp32["test_accuracy"]) < 0.02
    # 75% of each kernel is pruned exactly; biases stay dense
    kernels = 64 * 800 + 800 * 800 + 800 * 10
    biases = 800 + 800 + 10
    assert rows["distilled, 75% sparse"]["nonzeros"] <= round(0.25 * kernels) + biases
    assert rows["distilled, 75% sparse"]["parameters"] == kernels + biases
    # a fresh evaluation of the saved checkpoints reproduces the table
    again = demo.evaluate_checkpoints(
        sorted((out / "checkpoints" / "seed0").iterdir(), key=lambda p: int(p.name)),
        data_name="digits",
        data_dir=None,
        seed=0,
    )
    np.testing.assert_allclose(
        [r["test_accuracy"] for r in again], [r["test_accuracy"] for r in results["rows"]]
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "cifar"], "--data 'cifar' is unknown"),
        (["--data", "fashion_mnist", "--data-dir", "/nonexistent/folder"], "is not an existing"),
        (["--sparsity", "1.0"], "--sparsity 1.0 is outside [0, 1)"),
        (["--sparsity", "-0.1"], "outside [0, 1)"),
        (["--bits", "9"], "--bits 9 is outside 2-8"),
        (["--bits", "1"], "--bits 1 is outside 2-8"),
        (["--epochs", "0"], "--epochs 0 must be at least 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert cli.main(["demo", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_failure_midway_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")

    def boom(config, seed, stage_dir, timings):
        (stage_dir / "results.json").write_text("{half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_run_seed", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.run(demo.DemoConfig(out=str(out), quick=True))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_console_script_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxcomp.cli", "demo", "--sparsity", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "jaxcomp demo: error: --sparsity 2.0 is outside [0, 1)\n"
    unknown = subprocess.run(
        [sys.executable, "-m", "jaxcomp.cli", "demo", "--nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
