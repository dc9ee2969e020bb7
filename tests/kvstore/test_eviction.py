"""Eviction policies: LRU order, S3-FIFO's queues, iterators that survive eviction as they go."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.errors import ConfigError
from kvstrata.kvstore.eviction import EvictionPolicy, LRUPolicy, S3FIFOPolicy, make_policy


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_make_policy() -> None:
    assert isinstance(make_policy(), LRUPolicy)
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("s3fifo"), S3FIFOPolicy)
    with pytest.raises(ConfigError):
        make_policy("random")


def test_lru_order_touch_and_remove() -> None:
    p = LRUPolicy()
    for i in range(5):
        p.insert(k(i), 100)
    p.touch(k(1))
    p.touch(k(99))  # unknown keys are ignored
    assert list(p.candidates()) == [k(0), k(2), k(3), k(4), k(1)]
    p.remove(k(3))
    p.remove(k(3))  # no error when absent
    assert list(p.candidates()) == [k(0), k(2), k(4), k(1)]
    p.insert(k(0), 50)  # re-insert: updated and most recent
    assert list(p.candidates()) == [k(2), k(4), k(1), k(0)]
    assert len(p) == 4 and k(0) in p and k(3) not in p


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_evicting_while_iterating(name: str) -> None:
    p = make_policy(name)
    for i in range(10):
        p.insert(k(i), 10)
    order = list(p.candidates())
    pinned = {k(2), k(5)}
    seen = []
    for key in p.candidates():  # evict as we go, skipping "pinned" keys, as a tier does
        seen.append(key)
        if key not in pinned:
            p.remove(key)
    assert seen == order
    assert len(p) == 2 and set(p.candidates()) == pinned


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_skipped_key_is_yielded_first_again(name: str) -> None:
    p = make_policy(name)
    for i in range(4):
        p.insert(k(i), 10)
    it = p.candidates()
    first = next(it)
    second = next(it)
    p.remove(second)
    assert next(iter(p.candidates())) == first


def test_s3fifo_scan_does_not_flush_the_working_set() -> None:
    capacity = 20
    s3, lru = S3FIFOPolicy(), LRUPolicy()

    def access(p: EvictionPolicy, key: bytes) -> bool:
        if key in p:
            p.touch(key)
            return True
        while len(p) >= capacity:
            p.remove(next(iter(p.candidates())))
        p.insert(key, 1)
        return False

    hot = [k(i) for i in range(10)]
    for p in (s3, lru):
        for _ in range(3):
            for key in hot:
                access(p, key)
        for i in range(1000, 1060):  # a one-pass scan three times the cache size
            access(p, k(i))
    assert all(key in s3 for key in hot), "S3-FIFO keeps the reused keys through a scan"
    assert not any(key in lru for key in hot), "LRU loses them (the contrast S3-FIFO exists for)"


def test_s3fifo_ghost_readmits_to_main() -> None:
    p = S3FIFOPolicy(min_ghost=4)
    for i in range(3):
        p.insert(k(i), 10)
    p.remove(k(0))  # leaves the small queue unread: remembered as a ghost
    p.insert(k(0), 10)  # back soon: straight into the main queue
    for i in range(3, 8):
        p.insert(k(i), 10)
    # small holds most bytes, so the small queue is evicted first and k(0) (main) comes last
    assert list(p.candidates())[-1] == k(0)


def test_s3fifo_frequency_spares_reinserted_keys() -> None:
    p = S3FIFOPolicy()
    for i in range(10):
        p.insert(k(i), 10)
    p.touch(k(0))
    order = list(p.candidates())
    assert order[-1] == k(0), "a read key in the small queue moves to the main queue"
    assert sorted(order) == sorted(k(i) for i in range(10))


def test_s3fifo_rejects_bad_fraction() -> None:
    with pytest.raises(ConfigError):
        S3FIFOPolicy(small_fraction=1.5)


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "touch", "remove", "evict"]), st.integers(0, 15), st.integers(1, 64)
    ),
    max_size=120,
)


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_policies_track_exactly_the_present_keys(name: str, ops: list[tuple[str, int, int]]) -> None:
    p = make_policy(name)
    present: set[bytes] = set()
    rng = random.Random(len(ops))
    for op, i, size in ops:
        key = k(i)
        if op == "insert":
            p.insert(key, size)
            present.add(key)
        elif op == "touch":
            p.touch(key)
        elif op == "remove":
            p.remove(key)
            present.discard(key)
        else:
            for victim in p.candidates():  # evict a random number of victims, skipping some
                if rng.random() < 0.3:
                    continue
                p.remove(victim)
                present.discard(victim)
                if rng.random() < 0.5:
                    break
        order = list(p.candidates())
        assert len(order) == len(set(order)), "each key is yielded once"
        assert set(order) == present
        assert len(p) == len(present)
        assert all(key in p for key in present)
