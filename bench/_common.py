"""Shared harness of the benchmarks: timing, and one JSON object per measurement on stdout.

Every measurement is printed as ``{"bench", "case", "value", "unit", "ceiling", "ratio"}`` where the
ceiling is measured in the same run, on the same machine and the same bytes; ``ratio = value / ceiling``
for throughputs (higher is better) and ``ceiling / value`` for latencies, so a ratio >= 1 always means
"as good as the ceiling". Absolute figures vary between runs on shared machines; ratios hold.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

GIB = 1024**3


def emit(bench: str, case: str, value: float, unit: str, ceiling: float | None = None, **extra: Any) -> None:
    """Print one measurement as a JSON line (the ratio is derived from ``unit``)."""
    ratio: float | None = None
    if ceiling:
        lower_is_better = unit in ("s", "ms", "us", "ns")
        ratio = (ceiling / value if value else 0.0) if lower_is_better else value / ceiling
    record = {
        "bench": bench,
        "case": case,
        "value": round(value, 4),
        "unit": unit,
        "ceiling": None if ceiling is None else round(ceiling, 4),
        "ratio": None if ratio is None else round(ratio, 3),
        **extra,
    }
    print(json.dumps(record), flush=True)


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeat`` timed calls of ``fn`` (after ``warmup`` untimed ones), in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """The median of ``repeat`` timed calls of ``fn``, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gib_per_s(num_bytes: int, seconds: float) -> float:
    """Throughput in GiB/s."""
    return num_bytes / seconds / GIB if seconds > 0 else 0.0


def log(message: str) -> None:
    """Progress for humans, on stderr (stdout carries only JSON lines)."""
    print(message, file=sys.stderr, flush=True)
