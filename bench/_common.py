"""Shared harness of the benchmarks: timing, and one JSON object per measurement on stdout.

Every measurement is printed as ``{"bench", "case", "value", "unit", "ceiling", "ratio"}`` where the
ceiling is measured in the same run, on the same machine and the same bytes; ``ratio = value / ceiling``
for throughputs (higher is better) and ``ceiling / value`` for latencies, so a ratio >= 1 always means
"as good as the ceiling". Absolute figures vary between runs on shared machines; ratios hold.

Cases timed in turns with their ceiling (:func:`interleaved`) also carry ``paired_ratio``: the median over
the rounds of each round's ratio. ``ratio`` compares the best round of each side; on a machine whose speed
swings from round to round the two bests can come from different moments, and the paired median says how
the two compare at the same moment.
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


#: Quiet before each timed call of :func:`interleaved`. torch's OpenMP workers keep spinning for about
#: 15 ms after a parallel op (libgomp's default spin count), so a call timed right after a ``copy_``
#: ceiling ran with one core taken: measured with 64 x 256 KiB shm put+get, median 10.5 ms right after a
#: ``copy_`` round against 8.7 ms after 20 ms of quiet, and no difference with OMP_WAIT_POLICY=passive.
SETTLE_S = 0.025


def interleaved(repeat: int, *fns: Callable[[], object], settle_s: float = SETTLE_S) -> list[list[float]]:
    """Times of each function in each of ``repeat`` rounds (``[round][fn]``, seconds), the functions timed
    in turns within a round so that all of them see the same machine load.

    Each timed call comes after ``settle_s`` of quiet (so that none inherits threads the one before left
    spinning) and one untimed call of the same function (so that none pays for waking threads and caches
    that the quiet put to sleep: on a small VM that cost 0.6-0.8 ms of a 4 ms shm put): each is timed in
    its steady state."""
    for fn in fns:
        fn()
    rounds = []
    for _ in range(repeat):
        times = []
        for fn in fns:
            if settle_s:
                time.sleep(settle_s)
            fn()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rounds.append(times)
    return rounds


def paired_ratio(rounds: list[list[float]], ceiling: int, case: int) -> float:
    """Median over ``rounds`` (from :func:`interleaved`) of the ceiling's time / the case's time: the
    throughput ratio of the two at the same moment."""
    return statistics.median(r[ceiling] / r[case] for r in rounds if r[case] > 0)


def gib_per_s(num_bytes: int, seconds: float) -> float:
    """Throughput in GiB/s."""
    return num_bytes / seconds / GIB if seconds > 0 else 0.0


def log(message: str) -> None:
    """Progress for humans, on stderr (stdout carries only JSON lines)."""
    print(message, file=sys.stderr, flush=True)
