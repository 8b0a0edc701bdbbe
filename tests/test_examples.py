"""The example scripts run end to end (short versions)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_train_loop_example(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "own_train_loop.py"),
            "--steps",
            "40",
            "--out",
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    kernels = re.findall(r"Dense_\d/kernel\s+\S+\s+int8\s+\S+\s+(\S+)", result.stdout)
    assert kernels == ["0.8000"] * 3  # every kernel pruned to exactly 80%, stored as int8
    accuracy = float(re.search(r"test accuracy (\S+)", result.stdout).group(1))
    assert accuracy > 0.3  # 40 steps on 10 classes: well above chance
