"""The memory backend: the conformance suite, plus its bound, slot reclaim and injected-clock leases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstrata.config import IndexConfig
from kvstrata.errors import BlockIndexError
from kvstrata.index.base import open_index
from kvstrata.index.memory import MemoryBlockIndex
from tests.index.conformance_index import IndexConformance, make_keys, summary


class TestMemoryConformance(IndexConformance):
    @pytest.fixture
    def index(self) -> Iterator[MemoryBlockIndex]:
        idx = open_index("memory", config=IndexConfig(lease_ttl_s=600.0))
        assert isinstance(idx, MemoryBlockIndex)
        yield idx
        idx.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lease_expiry_with_an_injected_clock() -> None:
    clock = FakeClock()
    idx = MemoryBlockIndex(lease_ttl_s=10.0, clock=clock)
    keys = make_keys(3)
    idx.add("a", "host", keys)
    clock.now += 9.9
    assert "a" in idx.lookup(keys).matches
    clock.now += 0.2
    assert idx.lookup(keys).matches == {}
    assert idx.instances() == []
    idx.heartbeat("a")
    assert summary(idx.lookup(keys)) == {"a": (3, {"host": 3})}


def test_bounded_by_its_lru_and_hot_entries_survive() -> None:
    idx = MemoryBlockIndex(max_blocks=100, lease_ttl_s=600.0)
    hot = make_keys(10, "hot")
    idx.add("a", "host", hot)
    for round_ in range(30):
        idx.add("a", "host", make_keys(10, f"cold{round_}"))
        assert summary(idx.lookup(hot)) == {"a": (10, {"host": 10})}  # a lookup refreshes them
        assert len(idx) <= 100
    assert idx.snapshot_stats().evictions > 0
    assert idx.lookup(make_keys(10, "cold0")).matches == {}  # cold entries were evicted


def test_clears_reclaim_slots_and_stale_entries() -> None:
    idx = MemoryBlockIndex(max_instances=2, lease_ttl_s=600.0)
    keys = make_keys(5)
    idx.add("b", "disk", keys[:2])
    for i in range(10):
        idx.add("a", "host", keys[: 1 + i % 5])
        idx.clear("a")
    idx.add("a", "device", keys)
    assert summary(idx.lookup(keys)) == {"a": (5, {"device": 5}), "b": (2, {"disk": 2})}
    assert len(idx) == 5  # the stale bits of the cleared epochs were swept out


def test_too_many_live_instances_is_a_typed_error() -> None:
    idx = MemoryBlockIndex(max_instances=2, lease_ttl_s=600.0)
    keys = make_keys(1)
    idx.add("a", "host", keys)
    idx.add("b", "host", keys)
    with pytest.raises(BlockIndexError):
        idx.add("c", "host", keys)


def test_dead_instances_give_their_slot_back() -> None:
    clock = FakeClock()
    idx = MemoryBlockIndex(max_instances=2, lease_ttl_s=5.0, clock=clock)
    keys = make_keys(2)
    idx.add("a", "host", keys)
    idx.add("b", "host", keys)
    clock.now += 6.0
    idx.add("c", "disk", keys)
    assert summary(idx.lookup(keys)) == {"c": (2, {"disk": 2})}


def test_closed_index_raises() -> None:
    idx = MemoryBlockIndex()
    idx.close()
    with pytest.raises(BlockIndexError):
        idx.lookup(make_keys(1))
