"""HostTier specifics: external (shared-memory) buffers, slot spans, zero-copy handles, slab accounting,
mixed-size workloads checked against a model."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.core.chunk import ChunkHandle
from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError, TierFullError
from kvstrata.kvstore.device import DeviceTier
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.kvstore.tier import TierEvent
from tests.kvstore.conformance_tier import check_stamped, chunk_key, pattern, stamped

SLOT = 4096


def test_slot_span_points_into_the_external_buffer() -> None:
    buffer = torch.zeros(10 * SLOT + 7, dtype=torch.uint8)
    tier = HostTier(8 * SLOT, SLOT, buffer=buffer)
    assert tier.buffer.data_ptr() == buffer.data_ptr()
    spans = {}
    for i in range(8):
        key = chunk_key(i)
        data = pattern(key, SLOT - i)
        tier.put(key, data)
        span = tier.slot_span(key)
        assert span is not None
        offset, length = span
        assert length == SLOT - i and offset % SLOT == 0 and offset + length <= 8 * SLOT
        assert torch.equal(buffer[offset : offset + length], data), "the bytes lie where slot_span says"
        spans[offset] = key
    assert len(spans) == 8, "every chunk has its own slot"
    assert tier.slot_span(chunk_key(99)) is None
    assert bool((buffer[8 * SLOT :] == 0).all()), "nothing is written past capacity_bytes"


def test_acquire_is_zero_copy_and_span_stays_valid_while_pinned() -> None:
    tier = HostTier(2 * SLOT, SLOT)
    key = chunk_key(1)
    data = pattern(key, SLOT)
    tier.put(key, data)
    span = tier.slot_span(key)
    assert span is not None
    with tier.acquire(key) as handle:  # type: ignore[union-attr]
        assert handle.data.data_ptr() == tier.buffer.data_ptr() + span[0]
        for i in range(2, 6):  # churn the tier: the pinned slot is never handed out
            tier.put(chunk_key(i), pattern(chunk_key(i), SLOT))
        assert torch.equal(tier.buffer[span[0] : span[0] + SLOT], data)


def test_slot_accounting() -> None:
    tier = HostTier(4 * SLOT + 100, SLOT)
    assert tier.capacity_bytes == 4 * SLOT and tier.slot_bytes == SLOT
    tier.put(chunk_key(1), b"x" * 10)
    assert tier.used_bytes == 64, "a small chunk holds a slot of the smallest class"
    tier.put(chunk_key(3), b"x" * (SLOT // 2 + 1))
    assert tier.used_bytes == 64 + SLOT, "a chunk over half a page holds a whole page"
    tier.put(chunk_key(4), b"x" * 1000)
    assert tier.used_bytes == 64 + SLOT + 1024, "the smallest power-of-two class that holds it"
    assert tier.size_of(chunk_key(1)) == 10
    assert tier.victims(1) == [chunk_key(1)]
    assert tier.victims(65) == [chunk_key(1), chunk_key(3)], "victims add up slot sizes"
    with pytest.raises(ChunkTooLargeError):
        tier.put(chunk_key(2), torch.zeros(SLOT + 1, dtype=torch.uint8))


def test_get_meta_and_pinning_default() -> None:
    tier = HostTier(2 * SLOT, SLOT)
    assert tier.get_meta(chunk_key(1)) is None
    tier.put(chunk_key(1), b"abc")
    assert tier.get_meta(chunk_key(1)) is not None
    # Page-locking needs CUDA; without it the pool is plain pageable memory.
    assert tier._pool.pinned == torch.cuda.is_available()


def test_bad_buffers_are_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        HostTier(4 * SLOT, SLOT, buffer=torch.zeros(SLOT, dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError):
        HostTier(SLOT - 1, SLOT)
    if torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError):
            HostTier(SLOT, SLOT, buffer=torch.zeros(SLOT, dtype=torch.uint8, device="cuda"))


def test_s3fifo_policy_keeps_the_reused_chunk_through_a_scan() -> None:
    tier = HostTier(8 * SLOT, SLOT, policy="s3fifo")
    hot = chunk_key(0)
    tier.put(hot, pattern(hot, SLOT))
    assert tier.get(hot) is not None
    for i in range(1, 40):  # a scan of one-hit chunks, five times the tier
        tier.put(chunk_key(i), pattern(chunk_key(i), SLOT))
    got = tier.get(hot)
    assert got is not None and torch.equal(got, pattern(hot, SLOT))


def test_put_if_absent_keeps_the_present_value() -> None:
    tier = HostTier(2 * SLOT, SLOT)
    key = chunk_key(1)
    tier.put(key, pattern(key, SLOT, 1))
    tier.put(key, pattern(key, SLOT, 2), if_absent=True)
    got = tier.get(key)
    assert got is not None and torch.equal(got, pattern(key, SLOT, 1))
    assert tier.used_bytes == SLOT, "the slot reserved for the refused copy went back to the pool"
    other = chunk_key(2)
    tier.put(other, pattern(other, SLOT), if_absent=True)
    assert tier.contains(other)


def test_counters_are_exported_to_prometheus() -> None:
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"tier": "host"}) or 0.0

    before = {n: sample(f"kvstrata_tier_{n}_total") for n in ("hits", "misses", "puts", "evictions")}
    tier = HostTier(SLOT, SLOT)
    tier.put(chunk_key(1), b"a" * SLOT)
    tier.put(chunk_key(2), b"b" * SLOT)  # evicts chunk 1 (one page, each chunk fills it)
    assert tier.get(chunk_key(2)) is not None
    assert tier.get(chunk_key(1)) is None
    for name in before:
        assert sample(f"kvstrata_tier_{name}_total") - before[name] >= 1, name


# -- slab allocation: chunks of many sizes share the pool -------------------------------------------------
KIB = 1024
MIB = 1024**2


def test_a_tier_of_n_bytes_holds_n_over_size_small_chunks() -> None:
    # Small sizes keep the test quick (copies under torch's parallel grain size); the pool test checks the
    # 256 KiB chunks of an 8 MiB-page pool.
    for size, slot_size in ((16 * KIB, 16 * KIB), (12 * KIB, 16 * KIB), (4 * KIB, 4 * KIB)):
        tier = HostTier(1 * MIB, 256 * KIB, pin_memory=False)
        small = torch.zeros(size, dtype=torch.uint8)
        count = 0
        while True:
            try:
                tier.put(chunk_key(count), small, evict=False)
            except TierFullError:
                break
            count += 1
        assert count == 1 * MIB // slot_size, f"{count} chunks of {size} bytes in 1 MiB"
        assert tier.used_bytes == tier.capacity_bytes == 1 * MIB
        tier.close()


def _fill(tier: HostTier, sizes: list[int], salt: bytes = b"") -> list[bytes]:
    keys = [chunk_key(i, salt) for i in range(len(sizes))]
    for key, size in zip(keys, sizes, strict=True):
        tier.put(key, pattern(key, size), evict=False)
    return keys


def test_eviction_reuses_a_slot_of_the_same_class() -> None:
    tier = HostTier(2 * SLOT, SLOT)  # classes 64 .. 2048, 4096
    keys = _fill(tier, [1024] * 8)  # both pages cut into 1 KiB slots
    assert not tier.fits(1000) and tier.victims_for(1000) == [keys[0]]
    tier.put(chunk_key(100), pattern(chunk_key(100), 1000))
    assert not tier.contains(keys[0]) and len(tier) == 8, "only the coldest chunk of the class goes"
    assert tier.slot_span(chunk_key(100))[0] == 0  # type: ignore[index]


def test_eviction_frees_the_first_page_all_of_whose_chunks_are_cold() -> None:
    tier = HostTier(3 * SLOT, SLOT)
    keys = _fill(tier, [SLOT] + [1024] * 8)  # page 0: one whole-page chunk; pages 1, 2: four 1 KiB each
    order = [keys[1], keys[5], keys[2], keys[6], keys[3], keys[7], keys[4], keys[8]]
    for key in order:
        assert tier.get(key) is not None  # coldest first: page 1 and page 2 interleaved
    assert tier.get(keys[0]) is not None  # the whole-page chunk is the hottest
    big = chunk_key(200)
    assert tier.victims_for(3000) == [keys[1], keys[2], keys[3], keys[4]], "page 1 completes first"
    tier.put(big, pattern(big, 3000))
    assert [tier.contains(k) for k in keys] == [True] + [False] * 4 + [True] * 4
    assert tier.slot_span(big)[0] == SLOT  # type: ignore[index]
    assert tier.used_bytes == 2 * SLOT + 4 * 1024 <= tier.capacity_bytes
    got = tier.get(big)
    assert got is not None and torch.equal(got, pattern(big, 3000))


def test_a_pinned_slot_keeps_its_page_and_a_blocked_put_evicts_nothing() -> None:
    tier = HostTier(2 * SLOT, SLOT)
    keys = _fill(tier, [SLOT, 1024, 1024])
    with tier.acquire(keys[0]), tier.acquire(keys[2]):  # type: ignore[union-attr]
        assert tier.victims_for(SLOT) == []
        with pytest.raises(TierFullError):
            tier.put(chunk_key(9), pattern(chunk_key(9), SLOT))
        assert len(tier) == 3, "nothing was evicted for nothing"
        tier.put(chunk_key(10), pattern(chunk_key(10), 1024))  # a free 1 KiB slot next to the pinned one
        tier.remove(keys[2])  # hidden at once; its slot is freed on release
        with pytest.raises(TierFullError):
            tier.put(chunk_key(9), pattern(chunk_key(9), SLOT))
    assert tier.victims_for(SLOT) == [keys[0]], "released: the whole-page chunk is the coldest way"
    tier.put(chunk_key(9), pattern(chunk_key(9), SLOT))
    assert tier.contains(chunk_key(9)) and not tier.contains(keys[0])


def test_store_demotes_exactly_what_makes_room_for_a_larger_chunk() -> None:
    top = HostTier(2 * SLOT, SLOT)
    bottom = DeviceTier(16 * SLOT, SLOT, device="cpu")
    store = Store([top, bottom], high_watermark=1.0, low_watermark=1.0)
    try:
        sizes = [512] * 16  # both top pages cut into 512-byte slots
        keys = [chunk_key(i) for i in range(16)]
        for key, size in zip(keys, sizes, strict=True):
            store.put(key, pattern(key, size))
        assert len(top) == 16 and len(bottom) == 0
        big = chunk_key(100)
        store.put(big, pattern(big, SLOT))
        assert top.contains(big)
        demoted = [k for k in keys if bottom.contains(k)]
        assert demoted == keys[:8], "the coldest page's chunks were demoted, no more"
        for key, size in zip(keys, sizes, strict=True):
            got = store.get(key)
            assert got is not None and torch.equal(got[:size], pattern(key, size)), "nothing lost"
    finally:
        store.close()


class _TierModel:
    """A HostTier checked against a dict: exact bytes, no overlapping live chunks, capacity respected."""

    def __init__(self, tier: HostTier) -> None:
        self.tier = tier
        self.data: dict[bytes, torch.Tensor] = {}
        tier.subscribe(self._on_event)

    def _on_event(self, event: TierEvent) -> None:
        if event.kind == "removed":
            for key in event.keys:
                self.data.pop(key, None)

    def check(self, pinned: list[torch.Tensor]) -> None:
        """``pinned``: the views of the handles held (their chunks may be removed or replaced since)."""
        tier = self.tier
        assert len(tier) == len(self.data) and tier.used_bytes <= tier.capacity_bytes
        slot_size = tier._pool.slot_size_for
        spans = set()
        for key, data in self.data.items():
            span = tier.slot_span(key)
            assert span is not None and span[1] == data.numel()
            spans.add((span[0], span[0] + slot_size(span[1])))
            view = tier.buffer[span[0] : span[0] + span[1]]
            assert torch.equal(view, data), "bytes lie exact where slot_span says"
        held = 0
        for view in pinned:
            offset = view.data_ptr() - tier.buffer.data_ptr()
            span = (offset, offset + slot_size(view.numel()))
            if span not in spans:  # a hidden chunk still pinned: its slot is held too
                spans.add(span)
                held += slot_size(view.numel())
        ordered = sorted(spans)
        for (_, end), (start, _) in itertools.pairwise(ordered):
            assert end <= start, "two live chunks overlap"
        expected = sum(slot_size(d.numel()) for d in self.data.values()) + held
        assert tier.used_bytes == expected, "used_bytes counts the class slots held"


def _mixed_workload(seed: int, steps: int, *, pages: int = 6) -> None:
    rng = random.Random(seed)
    tier = HostTier(pages * SLOT, SLOT)
    model = _TierModel(tier)
    sizes = [1, 64, 100, 500, 1024, 1500, 2048, 3000, SLOT]
    handles: list[tuple[ChunkHandle, torch.Tensor]] = []
    try:
        for step in range(steps):
            op = rng.random()
            key = chunk_key(rng.randrange(40))
            if op < 0.5:
                data = pattern(key, rng.choice(sizes), step)
                evict = rng.random() < 0.8
                try:
                    tier.put(key, data, evict=evict)
                except TierFullError:
                    assert not tier.fits(data.numel()), "refused a chunk that fits"
                    assert not evict or handles, "an evicting put fails only where pins block it"
                    assert not evict or tier.victims_for(data.numel()) == []
                else:
                    model.data[key] = data
            elif op < 0.65:
                present = key in model.data
                assert tier.remove(key) == present
                model.data.pop(key, None)
            elif op < 0.9:
                got = tier.get(key)
                want = model.data.get(key)
                assert (got is None) == (want is None)
                assert want is None or torch.equal(got, want)  # type: ignore[arg-type]
            elif op < 0.95 and len(handles) < 3:
                handle = tier.acquire(key)
                if handle is not None:
                    handles.append((handle, handle.data.clone()))
            elif handles:
                handle, snapshot = handles.pop(rng.randrange(len(handles)))
                assert torch.equal(handle.data, snapshot), "a pinned chunk never changes"
                handle.release()
            if step % 8 == 0:
                model.check([h.data for h, _ in handles])
        for handle, snapshot in handles:
            assert torch.equal(handle.data, snapshot), "a pinned chunk never changes"
            handle.release()
        model.check([])
        for key in list(model.data):
            tier.remove(key)
        assert tier.used_bytes == 0 and tier._pool.free_pages == pages, "every page came back"
    finally:
        tier.close()


def test_mixed_sizes_random_workload_against_a_model() -> None:
    _mixed_workload(seed=7, steps=2500)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_mixed_sizes_random_workload_property(seed: int) -> None:
    _mixed_workload(seed, steps=150, pages=3)


def test_mixed_sizes_under_concurrent_puts_gets_and_pins() -> None:
    tier = HostTier(8 * SLOT, SLOT)
    sizes = [64, 300, 1024, 1500, 2048, 3000, SLOT]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for step in range(300):
                key = chunk_key(rng.randrange(24), bytes([seed]))
                op = rng.random()
                if op < 0.5:
                    try:
                        tier.put(key, stamped(key, rng.choice(sizes), step))
                    except TierFullError:
                        pass  # every page blocked by the other threads' pins: allowed, never wrong data
                elif op < 0.8:
                    got = tier.get(key)
                    if got is not None:
                        check_stamped(key, got)
                else:
                    handle = tier.acquire(key)
                    if handle is not None:
                        with handle:
                            before = handle.data.clone()
                            check_stamped(key, before)
                            churn = chunk_key(99, bytes([seed]))
                            tier.put(churn, stamped(churn, SLOT, step))
                            assert torch.equal(handle.data, before), "a pinned chunk changed"
                assert tier.used_bytes <= tier.capacity_bytes
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    for key in list(tier.keys()):
        assert tier.remove(key)
    assert tier.used_bytes == 0 and tier._pool.free_pages == 8, "every slot and page came back"
    tier.close()
