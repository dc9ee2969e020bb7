"""SlotPool: slots carved from one buffer, fresh slots in address order, freed slots reused first."""

from __future__ import annotations

import os

import pytest
import torch

from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.pool import SlotPool


def test_slots_are_views_of_one_buffer() -> None:
    pool = SlotPool(10_000, 1024)
    assert pool.num_slots == 9 and pool.free_slots == 9 and pool.used_slots == 0
    slots = [pool.alloc() for _ in range(9)]
    assert slots == list(range(9)), "fresh slots come in address order"
    assert pool.alloc() is None and pool.free_slots == 0
    base = pool.buffer.data_ptr()
    for slot in slots:
        assert slot is not None
        view = pool.view(slot, 100)
        assert view.data_ptr() == base + pool.offset(slot) == base + slot * 1024
        assert view.numel() == 100
    pool.view(3, 1024).fill_(7)
    assert bool((pool.buffer[3 * 1024 : 4 * 1024] == 7).all())


def test_freed_slots_are_reused_last_in_first_out() -> None:
    pool = SlotPool(4 * 1024, 1024)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    assert (a, b, c) == (0, 1, 2)
    pool.free(0)
    pool.free(2)
    assert pool.used_slots == 1
    assert pool.alloc() == 2, "the most recently freed (warm) slot first"
    assert pool.alloc() == 0
    assert pool.alloc() == 3, "then a fresh one"
    assert pool.alloc() is None


def test_external_buffer() -> None:
    buffer = torch.zeros(5000, dtype=torch.uint8)
    pool = SlotPool(4096, 1024, buffer=buffer)
    assert pool.buffer.data_ptr() == buffer.data_ptr()
    slot = pool.alloc()
    assert slot is not None
    pool.view(slot, 10).fill_(3)
    assert buffer[:10].tolist() == [3] * 10, "the pool writes into the caller's buffer"
    with pytest.raises(InvalidArgumentError):
        SlotPool(8192, 1024, buffer=buffer)  # too small
    with pytest.raises(InvalidArgumentError):
        SlotPool(1024, 1024, buffer=torch.zeros(2048, dtype=torch.float32))
    with pytest.raises(InvalidArgumentError):
        SlotPool(1024, 1024, buffer=torch.zeros(64, 64, dtype=torch.uint8))


def test_bad_sizes() -> None:
    with pytest.raises(InvalidArgumentError):
        SlotPool(100, 1024)
    with pytest.raises(InvalidArgumentError):
        SlotPool(1024, 0)


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_large_pool_commits_only_the_slots_in_use() -> None:
    before = _rss_bytes()
    pool = SlotPool(8 * 1024**3, 8 * 1024**2)  # 8 GiB of address space
    slot = pool.alloc()
    assert slot is not None
    pool.view(slot, 8 * 1024**2).fill_(1)
    assert pool.num_slots == 1024
    assert _rss_bytes() - before < 256 * 1024**2, "only the touched slot is resident"
    pool.close()
    assert pool.free_slots == 0 and pool.alloc() is None
