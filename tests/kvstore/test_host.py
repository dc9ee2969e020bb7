"""HostTier specifics: external (shared-memory) buffers, slot spans, zero-copy handles, slab accounting,
mixed-size workloads checked against a model."""

from __future__ import annotations

import pytest
import torch

from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError
from kvstrata.kvstore.host import HostTier
from tests.kvstore.conformance_tier import chunk_key, pattern

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
