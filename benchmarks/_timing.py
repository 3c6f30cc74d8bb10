"""Timing helpers for the benchmarks: median of repeated wall-clock measurements, interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict[str, float]]:
    """Run each ``fn`` (returning its own seconds-per-unit) once per round, alternating, so that slow phases of a
    shared machine hit every contender alike; returns ``{name: {"median": ..., "min": ...}}``."""
    results: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            results[k].append(fn())
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in results.items()}


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A contender for :func:`interleaved`: runs ``fn`` ``calls`` times and returns the seconds per call."""
    def run() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls
    return run
