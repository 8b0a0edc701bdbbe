"""examples/checkpoint_manager.py: orbax CheckpointManager with pruning state, best-step export."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_manager_example(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "checkpoint_manager.py"),
            "--epochs",
            "4",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    accs = [float(a) for a in re.findall(r"validation accuracy (\S+),", result.stdout)]
    kept = [
        int(s) for s in re.search(r"kept steps \[([^\]]*)\]", result.stdout).group(1).split(",")
    ]
    best = int(re.search(r"best step (\d+)", result.stdout).group(1))
    assert len(accs) == 4
    assert accs[best] == max(accs)  # the manager kept a best step by the metric
    assert {2, 3} <= set(kept) and len(kept) <= 3  # the last 2, plus the best
    assert all(accs[k] == max(accs) for k in set(kept) - {2, 3})
    assert sorted(p.name for p in (tmp_path / "run" / "train").iterdir() if p.name.isdigit()) == [
        str(s) for s in sorted(kept)
    ]
    assert "int8 export" in result.stdout
