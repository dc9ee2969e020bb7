"""The Store: write-back demotion, promotion, write-through, pinning, prefix lookup, background work."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from kvstrata.config import StoreConfig
from kvstrata.core.chunk import ChunkMeta, PrefixResult
from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError, StoreError, TierFullError
from kvstrata.kvstore.build import available_memory_bytes
from kvstrata.kvstore.device import DeviceTier
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.kvstore.tier import Tier, TierEvent
from tests.kvstore.conformance_tier import check_stamped, chunk_key, meta_for, pattern, stamped
from tests.kvstore.faulty import FaultyTier

SLOT = 4096


def two_tier(top: int = 4, bottom: int = 8, **kwargs: object) -> Store:
    return Store(
        [DeviceTier(top * SLOT, SLOT, device="cpu"), HostTier(bottom * SLOT, SLOT)],
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    made: list[Store] = []
    yield made
    for store in made:
        store.close()


def keep(stores: list[Store], store: Store) -> Store:
    stores.append(store)
    return store


def assert_within_capacity(store: Store) -> None:
    for tier in store.tiers:
        assert tier.used_bytes <= tier.capacity_bytes, f"{tier.name} over capacity"


def test_put_lands_on_top_and_full_top_demotes_write_back(stores: list[Store]) -> None:
    store = keep(stores, two_tier(high_watermark=1.0, low_watermark=1.0))
    device, host = store.tiers
    keys = [chunk_key(i) for i in range(12)]
    for key in keys:
        store.put(key, pattern(key, SLOT), meta_for(key))
        assert device.contains(key), "a put lands in the top tier"
        assert_within_capacity(store)
    assert len(device) == 4 and len(host) == 8
    assert all(host.contains(k) for k in keys[:8]), "the victims were demoted, not dropped"
    assert store.lookup_prefix(keys).num_chunks == 12, "nothing lost while a lower tier had room"
    for key in keys:
        got = (device if device.contains(key) else host).get(key)
        assert got is not None and torch.equal(got, pattern(key, SLOT))
    assert store.get_meta(keys[0]) == meta_for(keys[0])


def test_bottom_tier_drops_its_coldest(stores: list[Store]) -> None:
    store = keep(stores, two_tier(2, 3, high_watermark=1.0, low_watermark=1.0))
    keys = [chunk_key(i) for i in range(10)]
    for key in keys:
        store.put(key, pattern(key, SLOT))
        assert_within_capacity(store)
    store.flush()
    present = [k for k in keys if store.contains(k)]
    assert present == keys[-5:], "the newest chunks survive, the oldest fell off the bottom"


def test_get_promotes_a_lower_hit(stores: list[Store]) -> None:
    store = keep(stores, two_tier(high_watermark=1.0, low_watermark=1.0))
    device, host = store.tiers
    keys = [chunk_key(i) for i in range(6)]
    for key in keys:
        store.put(key, pattern(key, SLOT), meta_for(key))
    assert not device.contains(keys[0]) and host.contains(keys[0])
    # The top tier is full: the promotion (which must demote a victim first) runs in the background.
    out = torch.empty(SLOT, dtype=torch.uint8)
    got = store.get(keys[0], out=out)
    assert got is not None and torch.equal(out, pattern(keys[0], SLOT))
    assert store.flush(timeout=10)
    assert device.contains(keys[0]), "promoted to the top tier"
    handle = device.acquire(keys[0])
    assert handle is not None
    with handle:
        assert handle.meta == meta_for(keys[0]), "promotion keeps the metadata (block keys for the index)"
        assert torch.equal(handle.data, pattern(keys[0], SLOT))
    assert len(device) == 4 and store.background_errors == 0


def test_get_promotes_at_once_when_the_top_has_room(stores: list[Store]) -> None:
    store = keep(stores, two_tier())
    device, host = store.tiers
    key = chunk_key(1)
    host.put(key, pattern(key, SLOT), meta_for(key))
    got = store.get(key)
    assert got is not None and torch.equal(got, pattern(key, SLOT))
    assert device.contains(key) and device.get_meta(key) == meta_for(key)  # type: ignore[attr-defined]
    assert store.get(chunk_key(2)) is None


def test_watermark_demotion_in_the_background(stores: list[Store]) -> None:
    store = keep(stores, two_tier(10, 20, high_watermark=0.8, low_watermark=0.5))
    device, host = store.tiers
    for i in range(9):
        store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
    assert store.flush(timeout=10)
    assert device.used_bytes <= 0.5 * device.capacity_bytes, "demoted down to the low watermark"
    assert len(device) + len(host) == 9 and all(store.contains(chunk_key(i)) for i in range(9))


def test_write_through(stores: list[Store]) -> None:
    store = keep(stores, two_tier(write_through=True))
    device, host = store.tiers
    keys = [chunk_key(i) for i in range(3)]
    for key in keys:
        store.put(key, pattern(key, SLOT), meta_for(key))
    assert store.flush(timeout=10)
    for key in keys:
        assert device.contains(key) and host.contains(key)
        got = host.get(key)
        assert got is not None and torch.equal(got, pattern(key, SLOT))


def test_write_through_with_a_full_queue_applies_back_pressure(stores: list[Store]) -> None:
    slow = FaultyTier(HostTier(16 * SLOT, SLOT), delay_s=0.01)
    top = DeviceTier(16 * SLOT, SLOT, device="cpu")
    store = keep(stores, Store([top, slow], write_through=True, demotion_queue=1))
    keys = [chunk_key(i) for i in range(8)]
    for key in keys:
        store.put(key, pattern(key, SLOT))
    assert store.flush(timeout=10)
    assert all(slow.contains(k) for k in keys), "no write-through copy was lost to the bounded queue"


def test_a_new_put_drops_stale_lower_copies(stores: list[Store]) -> None:
    store = keep(stores, two_tier(2, 8, high_watermark=1.0, low_watermark=1.0))
    key = chunk_key(1)
    store.put(key, stamped(key, SLOT, 1))
    for i in range(2, 5):  # push the first version down to the host tier
        store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
    assert store.tiers[1].contains(key)
    store.put(key, stamped(key, SLOT, 2))
    assert not store.tiers[1].contains(key)
    for i in range(5, 8):  # and the second version down too
        store.put(chunk_key(i), pattern(chunk_key(i), SLOT))
    got = store.get(key)
    assert got is not None and check_stamped(key, got) == 2


def test_chunk_too_large_for_the_top_lands_lower(stores: list[Store]) -> None:
    store = keep(stores, Store([HostTier(4 * SLOT, SLOT), HostTierBig()]))
    key = chunk_key(1)
    data = pattern(key, 3 * SLOT)
    store.put(key, data)
    assert not store.tiers[0].contains(key) and store.tiers[1].contains(key)
    got = store.get(key)
    assert got is not None and torch.equal(got, data)
    with pytest.raises(ChunkTooLargeError):
        store.put(chunk_key(2), torch.zeros(64 * SLOT, dtype=torch.uint8))


class HostTierBig(HostTier):
    """A second host-memory tier with bigger slots, under another name."""

    name = "host-big"

    def __init__(self) -> None:
        super().__init__(16 * SLOT, 4 * SLOT)


def test_pinned_top_sends_puts_lower(stores: list[Store]) -> None:
    store = keep(stores, two_tier(1, 4, high_watermark=1.0, low_watermark=1.0))
    pinned = chunk_key(1)
    store.put(pinned, pattern(pinned, SLOT))
    handle = store.acquire(pinned)
    assert handle is not None
    with handle:
        store.put(chunk_key(2), pattern(chunk_key(2), SLOT))
        assert store.tiers[1].contains(chunk_key(2)), "the only top slot is pinned: the put lands lower"
        assert torch.equal(handle.data, pattern(pinned, SLOT))
        # A new value of the pinned key lands lower too, and the pinned old value no longer shadows it.
        store.put(pinned, pattern(pinned, SLOT, version=1))
        got = store.get(pinned)
        assert got is not None and torch.equal(got, pattern(pinned, SLOT, version=1))
        assert torch.equal(handle.data, pattern(pinned, SLOT)), "the reader still sees what it pinned"
    one_tier = keep(stores, Store([HostTier(SLOT, SLOT)]))
    one_tier.put(pinned, pattern(pinned, SLOT))  # fills the tier's only page
    with one_tier.acquire(pinned), pytest.raises(TierFullError):  # type: ignore[union-attr]
        one_tier.put(chunk_key(3), pattern(chunk_key(3), SLOT))


def test_pinning_under_concurrent_eviction(stores: list[Store]) -> None:
    store = keep(stores, two_tier(3, 3))
    pinned_keys = [chunk_key(i, b"pinned") for i in range(2)]
    for key in pinned_keys:
        store.put(key, stamped(key, SLOT, 7))
    handles = [store.acquire(k) for k in pinned_keys]
    assert all(h is not None for h in handles)
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for step in range(150):
                key = chunk_key(rng.randrange(40), b"churn")
                try:
                    store.put(key, stamped(key, SLOT, seed * 1000 + step))
                except TierFullError:
                    pass
                for handle in handles:
                    assert handle is not None
                    assert check_stamped(handle.key, handle.data) == 7, (
                        "a pinned chunk changed under its reader"
                    )
                assert_within_capacity(store)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0] if errors else None
    assert all(store.contains(k) for k in pinned_keys), "pinned chunks are never evicted"
    for handle in handles:
        assert handle is not None
        handle.release()
    # Once released they can go. Background demotions queued by the churn may still be moving chunks
    # (a pinned one included) and would land after the puts below: let each settle first.
    assert store.flush(timeout=10)
    for i in range(12):
        store.put(chunk_key(i, b"after"), pattern(chunk_key(i, b"after"), SLOT))
        assert store.flush(timeout=10)
    assert not any(store.contains(k) for k in pinned_keys)
    assert_within_capacity(store)


def test_a_failing_lower_tier_never_kills_the_workers(stores: list[Store]) -> None:
    lower = FaultyTier(HostTier(8 * SLOT, SLOT))
    store = keep(stores, Store([DeviceTier(2 * SLOT, SLOT, device="cpu"), lower], write_through=True))

    def exported() -> float:
        kinds = ("copy_down", "demote", "relieve", "promote")
        name = "kvstrata_store_background_errors_total"
        return sum(REGISTRY.get_sample_value(name, {"kind": k}) or 0.0 for k in kinds)

    exported_before = exported()
    lower.fail_writes = True
    for i in range(4):  # write-through copies fail in the background; demotions fail synchronously
        key = chunk_key(i)
        store.put(key, pattern(key, SLOT))
    assert store.flush(timeout=10)
    assert store.background_errors >= 4
    assert lower.stats.errors >= 4, "the failures are counted on the failing tier"
    assert exported() - exported_before == store.background_errors, "and exported to Prometheus"
    assert store.contains(chunk_key(3)) and len(store.tiers[0]) == 2, (
        "puts went on while the lower tier failed"
    )
    lower.fail_writes = False
    key = chunk_key(10)
    store.put(key, pattern(key, SLOT))
    assert store.flush(timeout=10)
    assert lower.contains(key), "the worker survived and copies again"


def test_a_failing_read_falls_through_to_a_lower_copy(stores: list[Store]) -> None:
    top = FaultyTier(DeviceTier(4 * SLOT, SLOT, device="cpu"))
    store = keep(stores, Store([top, HostTier(4 * SLOT, SLOT, policy="s3fifo")], write_through=True))
    key = chunk_key(1)
    store.put(key, pattern(key, SLOT))
    assert store.flush(timeout=10)
    top.fail_reads = True
    got = store.get(key)
    assert got is not None and torch.equal(got, pattern(key, SLOT))
    top.fail_reads = False


def test_lookup_prefix(stores: list[Store]) -> None:
    store = keep(stores, two_tier())
    device, host = store.tiers
    keys = [chunk_key(i) for i in range(6)]
    device.put(keys[0], b"a")
    host.put(keys[1], b"b")
    device.put(keys[2], b"c")
    host.put(keys[2], b"c")
    host.put(keys[4], b"e")  # after the gap: not part of the prefix
    assert store.lookup_prefix(keys) == PrefixResult(3, ("device", "host", "device"))
    assert store.lookup_prefix(keys[3:]) == PrefixResult(0, ())
    assert store.lookup_prefix([]) == PrefixResult(0, ())
    with pytest.raises(InvalidArgumentError):
        store.lookup_prefix([b"short"])


def test_remove_from_every_tier_and_events(stores: list[Store]) -> None:
    store = keep(stores, two_tier(2, 4, write_through=True))
    events: list[TierEvent] = []
    unsubscribe = store.subscribe(events.append)
    key = chunk_key(1)
    store.put(key, b"abc", meta_for(key))
    assert store.flush(timeout=10)
    stored = {(e.tier, e.keys) for e in events if e.kind == "stored"}
    assert stored == {("device", (key,)), ("host", (key,))}, "events of every tier are forwarded"
    assert all(e.block_keys == meta_for(key).block_keys for e in events)
    events.clear()
    assert store.remove(key) is True
    assert store.remove(key) is False
    assert not store.contains(key)
    assert {(e.kind, e.tier) for e in events} == {("removed", "device"), ("removed", "host")}
    unsubscribe()
    events.clear()
    store.put(chunk_key(2), b"x")
    assert events == []


def test_stats_and_close(stores: list[Store]) -> None:
    store = two_tier()
    store.put(chunk_key(1), b"abc")
    assert store.get(chunk_key(1)) is not None
    stats = store.stats()
    assert set(stats) == {"device", "host"}
    assert stats["device"].hits == 1 and stats["device"].chunks == 1
    assert store.tier("host") is store.tiers[1] and store.tier("disk") is None
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError):
        store.put(chunk_key(2), b"x")
    with pytest.raises(StoreError):
        store.get(chunk_key(1))


def test_bad_construction() -> None:
    with pytest.raises(InvalidArgumentError):
        Store([])
    with pytest.raises(InvalidArgumentError):
        Store([HostTier(SLOT, SLOT), HostTier(SLOT, SLOT)])
    with pytest.raises(InvalidArgumentError):
        Store([HostTier(SLOT, SLOT)], high_watermark=0.5, low_watermark=0.9)


def test_from_config_memory_tiers(stores: list[Store]) -> None:
    config = StoreConfig(
        device_cache_bytes=4 * SLOT,
        device="cpu",
        host_cache_bytes=8 * SLOT,
        slot_bytes=SLOT,
        disk_cache_bytes=0,
    )
    store = keep(stores, Store.from_config(config))
    assert [t.name for t in store.tiers] == ["device", "host"]
    assert store.tiers[0].capacity_bytes == 4 * SLOT and store.tiers[1].capacity_bytes == 8 * SLOT
    auto = keep(
        stores,
        Store.from_config(
            StoreConfig(
                device_cache_bytes=4 * SLOT, host_cache_bytes=8 * SLOT, slot_bytes=SLOT, disk_cache_bytes=0
            )
        ),
    )
    expected = ["device", "host"] if torch.cuda.is_available() else ["host"]
    assert [t.name for t in auto.tiers] == expected, "'auto' without CUDA adds no CPU device tier"


def test_from_config_with_a_caller_owned_host_buffer(stores: list[Store]) -> None:
    buffer = torch.zeros(6 * SLOT, dtype=torch.uint8)
    config = StoreConfig(host_cache_bytes=64 * SLOT, slot_bytes=SLOT, disk_cache_bytes=0)
    store = keep(stores, Store.from_config(config, host_buffer=buffer))
    host = store.tier("host")
    assert isinstance(host, HostTier) and host.capacity_bytes == 6 * SLOT, "bounded by the buffer"
    key = chunk_key(1)
    store.put(key, pattern(key, SLOT))
    span = host.slot_span(key)
    assert span is not None and torch.equal(buffer[span[0] : span[0] + span[1]], pattern(key, SLOT))


def test_from_config_host_fraction_of_available_memory(stores: list[Store]) -> None:
    available = available_memory_bytes()
    assert available > 0
    config = StoreConfig(host_cache_bytes=0, host_cache_fraction=0.01, slot_bytes=1024**2, disk_cache_bytes=0)
    store = keep(stores, Store.from_config(config))
    host = store.tier("host")
    assert host is not None
    assert abs(host.capacity_bytes - available * 0.01) <= 0.2 * available * 0.01 + 1024**2


def test_from_config_with_disk_and_promotion_from_disk(stores: list[Store], tmp_path: Path) -> None:
    pytest.importorskip("kvstrata.kvstore.disk")
    config = StoreConfig(
        host_cache_bytes=2 * SLOT,
        slot_bytes=SLOT,
        disk_cache_bytes=64 * SLOT,
        disk_dir=str(tmp_path / "disk"),
    )
    store = keep(stores, Store.from_config(config))
    assert [t.name for t in store.tiers] == ["host", "disk"]
    keys = [chunk_key(i) for i in range(6)]
    for key in keys:
        store.put(key, pattern(key, SLOT), meta_for(key))
    assert store.flush(timeout=10)
    disk = store.tier("disk")
    assert disk is not None and disk.contains(keys[0])
    got = store.get(keys[0])
    assert got is not None and torch.equal(got, pattern(keys[0], SLOT))
    assert store.flush(timeout=10)
    assert store.tiers[0].contains(keys[0]), "promoted from disk"
    assert store.get_meta(keys[0]) == meta_for(keys[0])


@pytest.mark.parametrize("with_disk", [False, True])
def test_thread_safety_hammer(stores: list[Store], tmp_path: Path, with_disk: bool) -> None:
    tiers: list[Tier] = [DeviceTier(3 * SLOT, SLOT, device="cpu"), HostTier(6 * SLOT, SLOT, policy="s3fifo")]
    if with_disk:
        disk = pytest.importorskip("kvstrata.kvstore.disk")
        tiers.append(disk.DiskTier(tmp_path / "disk", 10 * (SLOT + 8192)))
    store = keep(stores, Store(tiers, demotion_workers=2, demotion_queue=4, write_through=with_disk))
    keys = [chunk_key(i, b"hammer") for i in range(24)]
    errors: list[BaseException] = []
    deadline = time.monotonic() + 2.0

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        out = torch.empty(SLOT, dtype=torch.uint8)
        try:
            step = 0
            while time.monotonic() < deadline and step < 400:
                step += 1
                key = rng.choice(keys)
                op = rng.random()
                if op < 0.4:
                    try:
                        store.put(key, stamped(key, SLOT, seed * 10000 + step), ChunkMeta(block_keys=(key,)))
                    except TierFullError:
                        pass
                elif op < 0.7:
                    got = store.get(key, out=out if rng.random() < 0.5 else None)
                    if got is not None:
                        check_stamped(key, got)
                elif op < 0.85:
                    handle = store.acquire(key)
                    if handle is not None:
                        with handle:
                            check_stamped(key, handle.data)
                elif op < 0.92:
                    store.remove(key)
                else:
                    result = store.lookup_prefix(keys[:6])
                    assert result.num_chunks == len(result.tiers) <= 6
                assert_within_capacity(store)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    if errors:
        raise errors[0]
    assert store.flush(timeout=10)
    assert store.background_errors == 0
    assert_within_capacity(store)
    for key in keys:
        got = store.get(key)
        if got is not None:
            check_stamped(key, got)
