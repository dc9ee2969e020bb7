"""Reserve, fill, commit: PooledTier.reserve and Store.reserve (invisible until commit, abort frees)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from kvstrata.core.chunk import ChunkMeta
from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError, StoreError, TierFullError
from kvstrata.kvstore.device import DeviceTier
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.kvstore.tier import TierEvent
from tests.kvstore.conformance_tier import chunk_key, meta_for, pattern

SLOT = 4096


@pytest.fixture
def tier() -> Iterator[HostTier]:
    t = HostTier(4 * SLOT, SLOT)
    yield t
    t.close()


def fill(res: object, data: torch.Tensor) -> None:
    res.data.copy_(data)  # type: ignore[attr-defined]


def test_invisible_until_commit(tier: HostTier) -> None:
    key = chunk_key(1)
    data = pattern(key, SLOT)
    events: list[TierEvent] = []
    tier.subscribe(events.append)
    res = tier.reserve(key, SLOT, meta_for(key))
    assert res.data.numel() == SLOT and res.data.dtype == torch.uint8
    assert res.data.data_ptr() == tier.buffer.data_ptr() + res.offset
    fill(res, data)
    assert tier.get(key) is None and not tier.contains(key) and tier.acquire(key) is None
    assert len(tier) == 0 and list(tier.keys()) == [] and tier.slot_span(key) is None
    assert events == [] and tier.stats.puts == 0
    assert res.commit() is True
    got = tier.get(key)
    assert got is not None and torch.equal(got, data)
    assert tier.get_meta(key) == meta_for(key)
    assert [(e.kind, e.keys) for e in events] == [("stored", (key,))]
    assert tier.stats.puts == 1 and tier.stats.bytes_written == SLOT


def test_abort_frees_and_leaves_nothing(tier: HostTier) -> None:
    key = chunk_key(1)
    res = tier.reserve(key, SLOT)
    assert tier.used_bytes == SLOT
    fill(res, pattern(key, SLOT))
    res.abort()
    assert tier.used_bytes == 0 and not tier.contains(key) and tier.get(key) is None
    res.abort()  # idempotent
    with pytest.raises(InvalidArgumentError):
        res.commit()
    assert not tier.contains(key)
    # A with block that raises aborts; one that commits keeps the chunk.
    with pytest.raises(RuntimeError), tier.reserve(key, SLOT):
        raise RuntimeError("short read")
    assert tier.used_bytes == 0 and not tier.contains(key)
    with tier.reserve(key, SLOT) as res2:
        fill(res2, pattern(key, SLOT))
        res2.commit()
    assert tier.contains(key) and tier.used_bytes == SLOT
    res2.abort()  # after commit: a no-op, the chunk stays
    got = tier.get(key)
    assert got is not None and torch.equal(got, pattern(key, SLOT))


def test_commit_replaces_an_older_value(tier: HostTier) -> None:
    key = chunk_key(1)
    tier.put(key, pattern(key, SLOT, version=1))
    res = tier.reserve(key, SLOT // 2)
    fill(res, pattern(key, SLOT // 2, version=2))
    old = tier.get(key)
    assert old is not None and torch.equal(old, pattern(key, SLOT, version=1)), "old value until commit"
    res.commit()
    got = tier.get(key)
    assert got is not None and torch.equal(got, pattern(key, SLOT // 2, version=2))
    assert len(tier) == 1 and tier.used_bytes == SLOT // 2
    # if_absent keeps the stored value and frees the reservation.
    res3 = tier.reserve(key, SLOT)
    assert res3.commit(if_absent=True) is False
    assert tier.used_bytes == SLOT // 2 and tier.size_of(key) == SLOT // 2


def test_reserved_slot_is_pinned_not_evictable(tier: HostTier) -> None:
    held = tier.reserve(chunk_key(0), SLOT)
    fill(held, pattern(chunk_key(0), SLOT))
    for i in range(1, 4):
        tier.put(chunk_key(i), pattern(chunk_key(i), SLOT))
    assert tier.used_bytes == tier.capacity_bytes
    # Room for more is made by evicting stored chunks only, never the reservation.
    for i in range(4, 10):
        tier.put(chunk_key(i), pattern(chunk_key(i), SLOT))
        assert torch.equal(held.data, pattern(chunk_key(0), SLOT)), "a reserved slot was reused"
    assert chunk_key(0).hex() not in {k.hex() for k in tier.victims(tier.capacity_bytes)}
    held.commit()
    got = tier.get(chunk_key(0))
    assert got is not None and torch.equal(got, pattern(chunk_key(0), SLOT))


def test_full_of_reservations_raises_and_capacity_is_exact(tier: HostTier) -> None:
    held = [tier.reserve(chunk_key(i), SLOT) for i in range(4)]
    assert tier.used_bytes == tier.capacity_bytes
    with pytest.raises(TierFullError):
        tier.reserve(chunk_key(9), SLOT)
    with pytest.raises(TierFullError):
        tier.put(chunk_key(9), pattern(chunk_key(9), SLOT))
    with pytest.raises(TierFullError):
        tier.reserve(chunk_key(9), 100, evict=False)
    with pytest.raises(ChunkTooLargeError):
        tier.reserve(chunk_key(9), SLOT + 1)
    # Small reservations share a page by size class; capacity counts slot sizes.
    held[0].abort()
    small = [tier.reserve(chunk_key(10 + i), 1000) for i in range(4)]  # four 1 KiB slots of one page
    assert tier.used_bytes == tier.capacity_bytes
    for res in held[1:] + small:
        res.abort()
    assert tier.used_bytes == 0 and len(tier) == 0


def test_reservations_after_close(tier: HostTier) -> None:
    res = tier.reserve(chunk_key(1), SLOT)
    tier.close()
    with pytest.raises(StoreError):
        res.commit()
    res.abort()
    with pytest.raises(StoreError):
        tier.reserve(chunk_key(2), SLOT)


def test_concurrent_reserve_and_commit() -> None:
    tier = HostTier(64 * SLOT, SLOT)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(200):
                key = chunk_key(w * 1000 + i % 16)
                version = i
                res = tier.reserve(key, SLOT, ChunkMeta(num_tokens=version))
                res.data.copy_(pattern(key, SLOT, version=version))
                if i % 5 == 4:
                    res.abort()
                    continue
                res.commit()
                got = tier.get(key)
                # Another thread may have replaced or evicted it, never with wrong bytes for its meta.
                if got is not None:
                    meta = tier.get_meta(key)
                    assert meta is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert tier.used_bytes <= tier.capacity_bytes
        # Every visible chunk is whole: its bytes are one committed version of its own key.
        for key in list(tier.keys()):
            got = tier.get(key)
            assert got is not None
            assert any(torch.equal(got, pattern(key, SLOT, version=v)) for v in range(200))
        assert tier.used_bytes == len(tier) * SLOT, "an aborted or replaced slot leaked"
    finally:
        tier.close()


# -- Store.reserve --------------------------------------------------------------------------------------


def two_tier() -> Store:
    return Store(
        [DeviceTier(2 * SLOT, SLOT, device="cpu"), HostTier(8 * SLOT, SLOT)],
        high_watermark=1.0,
        low_watermark=1.0,
    )


def test_store_reserve_demotes_to_make_room() -> None:
    store = two_tier()
    try:
        for i in range(2):
            store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
        res = store.reserve(chunk_key(5), SLOT, meta_for(chunk_key(5)))
        assert res is not None
        assert store.tiers[1].contains(chunk_key(0)), "the top's coldest chunk was demoted, not dropped"
        fill(res, pattern(chunk_key(5), SLOT))
        assert store.get(chunk_key(5)) is None
        res.commit()
        assert store.tiers[0].contains(chunk_key(5))
        for i in (0, 1, 5):
            got = store.get(chunk_key(i))
            assert got is not None and torch.equal(got, pattern(chunk_key(i), SLOT))
        assert store.get_meta(chunk_key(5)) == meta_for(chunk_key(5))
    finally:
        store.close()


def test_store_commit_drops_stale_copies_and_abort_keeps_the_old_value() -> None:
    store = two_tier()
    try:
        key = chunk_key(1)
        store.put(key, pattern(key, SLOT, version=1))
        for i in range(2, 5):  # push version 1 down
            store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
        assert store.tiers[1].contains(key) and not store.tiers[0].contains(key)
        with store.reserve(key, SLOT) as res:  # type: ignore[union-attr]
            fill(res, pattern(key, SLOT, version=2))
        got = store.get(key)  # aborted: the old value is still served
        assert got is not None and torch.equal(got, pattern(key, SLOT, version=1))
        for i in range(5, 8):
            store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
        assert store.tiers[1].contains(key)
        res = store.reserve(key, SLOT)
        assert res is not None
        fill(res, pattern(key, SLOT, version=3))
        res.commit()
        assert store.tiers[0].contains(key) and not store.tiers[1].contains(key)
        got = store.get(key)
        assert got is not None and torch.equal(got, pattern(key, SLOT, version=3))
    finally:
        store.close()


def test_store_reserve_returns_none_when_the_top_cannot_take_it() -> None:
    tiers = [DeviceTier(SLOT, SLOT, device="cpu"), HostTier(8 * SLOT, 4 * SLOT)]
    store = Store(tiers, high_watermark=1.0, low_watermark=1.0)
    try:
        assert store.reserve(chunk_key(1), 2 * SLOT) is None  # larger than the top's slots
        held = store.reserve(chunk_key(2), SLOT)
        assert held is not None
        assert store.reserve(chunk_key(3), SLOT) is None  # the only page is reserved (pinned)
        store.put(chunk_key(3), pattern(chunk_key(3), SLOT))  # the fallback lands lower
        assert store.tiers[1].contains(chunk_key(3))
        held.abort()
        assert store.tiers[0].used_bytes == 0
    finally:
        store.close()
    with pytest.raises(StoreError):
        store.reserve(chunk_key(4), SLOT)


def test_store_reserve_many_takes_what_fits_then_makes_room_and_commits_together() -> None:
    store = two_tier()
    events: list[TierEvent] = []
    try:
        store.put(chunk_key(0), pattern(chunk_key(0), SLOT))
        store.subscribe(events.append)
        specs = [(chunk_key(i), SLOT, meta_for(chunk_key(i))) for i in (1, 2, 3)]
        run = store.reserve_many(specs)
        # 1 fits in the free slot, 2 gets the slot of 0 (demoted), 3 finds both top slots reserved
        assert [r.key for r in run] == [chunk_key(1), chunk_key(2)]
        assert store.tiers[1].contains(chunk_key(0)), "the top's chunk was demoted to make room"
        for res in run:
            assert res.mem is not None and len(res.mem) == SLOT
            res.mem[:] = memoryview(pattern(res.key, SLOT).numpy())
            assert store.get(res.key) is None  # invisible until committed
        events.clear()
        run[1].abort()  # e.g. its checksum failed
        assert store.commit_many([run[0]]) == [None]
        stored = [e for e in events if e.kind == "stored"]
        assert [e.keys for e in stored] == [(chunk_key(1),)]
        got = store.get(chunk_key(1))
        assert got is not None and torch.equal(got, pattern(chunk_key(1), SLOT))
        assert store.get(chunk_key(2)) is None
        assert store.get_meta(chunk_key(1)) == meta_for(chunk_key(1))
        errors = store.commit_many([run[0]])  # committed already: the error its commit() would raise
        assert isinstance(errors[0], InvalidArgumentError)
        assert store.tiers[0].used_bytes == SLOT
    finally:
        store.close()
    with pytest.raises(StoreError):
        store.reserve_many(specs)


def test_tier_commit_many_emits_one_event_and_replaces_older_values(tier: HostTier) -> None:
    tier.put(chunk_key(1), pattern(chunk_key(1), SLOT, version=1))
    events: list[TierEvent] = []
    tier.subscribe(events.append)
    run = tier.reserve_many([(chunk_key(i), SLOT // 2, meta_for(chunk_key(i))) for i in (1, 2, 3)])
    assert len(run) == 3
    for res in run:
        fill(res, pattern(res.key, SLOT // 2, version=2))
    assert tier.commit_many(run) == [None, None, None]
    assert [(e.kind, e.keys) for e in events] == [("stored", tuple(chunk_key(i) for i in (1, 2, 3)))]
    for i in (1, 2, 3):
        got = tier.get(chunk_key(i))
        assert got is not None and torch.equal(got, pattern(chunk_key(i), SLOT // 2, version=2))
    assert len(tier) == 3


def test_store_acquire_many_pins_a_prefix_within_the_budget() -> None:
    store = two_tier()
    try:
        for i in range(4):  # 0 and 1 end up demoted below, 2 and 3 on top
            store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
        assert store.tiers[1].contains(chunk_key(0)) and store.tiers[0].contains(chunk_key(3))
        keys = [chunk_key(3), chunk_key(9), chunk_key(0), chunk_key(2)]
        handles = store.acquire_many(keys)
        try:
            assert [h is None for h in handles] == [False, True, False, False]
            for key, handle in zip(keys, handles, strict=True):
                if handle is not None:
                    assert torch.equal(handle.data, pattern(key, SLOT))
        finally:
            for handle in handles:
                if handle is not None:
                    handle.release()
        # a budget of two chunks: the first two hits, then it stops (the rest are asked for again)
        handles = store.acquire_many(keys, max_bytes=2 * SLOT)
        assert [h is None for h in handles] == [False, True, False]
        for handle in handles:
            if handle is not None:
                handle.release()
        one = store.acquire_many(keys[:1], max_bytes=1)  # the first hit is always taken
        assert len(one) == 1 and one[0] is not None
        one[0].release()
        assert all(e.pins == 0 for e in store.tiers[0]._catalog._entries.values())  # type: ignore[attr-defined]
    finally:
        store.close()


def test_reservations_renamed_after_writing_commit_together_under_their_new_keys() -> None:
    store = two_tier()
    try:
        run = store.reserve_many([(chunk_key(90 + i), SLOT, ChunkMeta()) for i in range(2)])
        assert len(run) == 2
        for i, res in enumerate(run):
            fill(res, pattern(chunk_key(i), SLOT))
            res.rename(chunk_key(i), meta_for(chunk_key(i)))
        with pytest.raises(InvalidArgumentError):
            run[0].rename(b"short")
        assert store.commit_many(run) == [None, None]
        for i in range(2):
            got = store.get(chunk_key(i))
            assert got is not None and torch.equal(got, pattern(chunk_key(i), SLOT))
            assert store.get_meta(chunk_key(i)) == meta_for(chunk_key(i))
            assert store.get(chunk_key(90 + i)) is None
    finally:
        store.close()
