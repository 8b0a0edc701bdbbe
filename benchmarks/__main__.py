"""Runs the benchmarks and prints one table of ratios; writes ``bench_out/results.json``.

Usage: ``python -m benchmarks [NAME ...] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
from pathlib import Path

import jax

from jaxcomp import report

# every benchmarks/bench_<name>.py with a ``run(quick=False) -> rows`` function
BENCHMARKS = {
    m.name.removeprefix("bench_"): f"benchmarks.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).parent)])
    if m.name.startswith("bench_")
}

COLUMNS = ["benchmark", "case", "ours_ms", "baseline_ms", "ratio", "target", "met"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("names", nargs="*", help=f"subset of {sorted(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    rows = []
    for name in args.names or BENCHMARKS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(importlib.import_module(BENCHMARKS[name]).run(quick=args.quick))
    print(report.format_table(rows, COLUMNS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
