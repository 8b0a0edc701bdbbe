"""examples/qat_fashion_mnist.py runs (digits, one epoch) and QAT recovers 2-bit accuracy."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_qat_example_on_digits():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "qat_fashion_mnist.py"),
            "--data",
            "digits",
            "--quick",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    acc = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(r"^\| ([^|]+)\|\s+\d+ \|\s+([0-9.]+) \|", result.stdout, re.M)
    }
    assert len(acc) == 7
    # 2-bit round-to-nearest loses accuracy that a short QAT fine-tune wins back
    rtn = acc["int2 per channel, post-training (RTN)"]
    assert acc["int2 per channel, QAT, STE"] > rtn and acc["int2 per channel, QAT, LSQ"] > rtn
