"""Timing helpers: warm-up, then the median of repeats, measured side by side."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` (blocked until its outputs are ready) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_without_native(fn: Callable, *args: Any) -> Callable:
    """``fn`` compiled for ``args`` with jaxcomp's native kernels off: XLA's own lowering."""
    before = os.environ.get("JAXCOMP_NATIVE")
    os.environ["JAXCOMP_NATIVE"] = "0"
    try:
        return jax.jit(fn).lower(*args).compile()
    finally:
        if before is None:
            del os.environ["JAXCOMP_NATIVE"]
        else:
            os.environ["JAXCOMP_NATIVE"] = before


def interleaved(
    ours: Callable[[], Any], baseline: Callable[[], Any], *, warmup: int = 2, repeats: int = 7
) -> tuple[float, float]:
    """Median times of ``ours`` and ``baseline``, alternating calls so drift hits both alike."""
    for _ in range(warmup):
        jax.block_until_ready(ours())
        jax.block_until_ready(baseline())
    t_ours, t_base = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (baseline, t_base)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            acc.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_base)


def row(
    benchmark: str,
    case: str,
    ours_s: float,
    baseline_s: float,
    *,
    target: str = "",
    passed: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A result row: times, ``ratio = ours / baseline`` and whether the target is met."""
    ratio = ours_s / baseline_s
    return {
        "benchmark": benchmark,
        "case": case,
        "ours_ms": 1e3 * ours_s,
        "baseline_ms": 1e3 * baseline_s,
        "ratio": ratio,
        "target": target,
        "met": "-" if passed is None else ("yes" if passed else "NO"),
        **extra,
    }
