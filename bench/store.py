"""Benchmarks of the tiered store: host tier vs ``torch.Tensor.copy_``, disk tier vs plain file I/O.

Run: ``python bench/store.py`` (one JSON object per line on stdout).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_host() -> None:
    """HostTier put/get of 1-4 MiB chunks against copy_ of the same bytes (owned by the host-tier work)."""
    raise NotImplementedError


def bench_disk() -> None:
    """DiskTier write/read against plain file write/read of the same bytes (owned by the disk-tier work)."""
    raise NotImplementedError


if __name__ == "__main__":
    bench_host()
    bench_disk()
