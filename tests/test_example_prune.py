"""examples/prune_fashion_mnist.py runs end to end on digits (tiny MLP, 2 epochs)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prune_example_on_digits():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "prune_fashion_mnist.py"),
            "--data",
            "digits",
            "--quick",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = cells
    assert list(rows) == ["dense", "gradual magnitude 90%", "2:4", "RigL 90% (ERK)"]
    n = {name: int(cells[2].replace(",", "")) for name, cells in rows.items()}
    compact = {name: int(cells[5].replace(",", "")) for name, cells in rows.items()}
    dense_bytes = int(rows["dense"][4].replace(",", ""))
    # 64-wide MLP on 8x8 digits: 64*64+64 + 64*64+64 + 64*10+10 = 8,970 parameters
    assert n["dense"] == 8970 and compact["dense"] == dense_bytes == 4 * 8970
    # gradual magnitude: every kernel keeps exactly 10% (410 + 410 + 64; biases: 138 dense);
    # 2:4 keeps half of every kernel; non-zeros can only be fewer (a kept weight may be 0)
    assert 0.9 * 1022 < n["gradual magnitude 90%"] <= 410 + 410 + 64 + 138
    assert 0.9 * 4554 < n["2:4"] <= (4096 + 4096 + 640) // 2 + 138
    assert compact["2:4"] < 0.57 * dense_bytes
    assert compact["RigL 90% (ERK)"] < 0.2 * dense_bytes
    assert float(rows["dense"][1]) > 0.5
