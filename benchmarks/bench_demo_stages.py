"""Wall time of each stage of the demo on the embedded digits data, as a share of the total."""

from __future__ import annotations

import tempfile

from jaxcomp import demo


def run(*, quick: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        results = demo.run(demo.DemoConfig(data="digits", out=out, quick=quick))
    stages = results["stage_seconds"]
    total = sum(stages.values())
    return [
        {
            "benchmark": "demo_stages",
            "case": name,
            "ours_ms": 1e3 * seconds,
            "baseline_ms": 1e3 * total,
            "ratio": seconds / total,
            "target": "share of total",
            "met": "-",
        }
        for name, seconds in stages.items()
    ]
