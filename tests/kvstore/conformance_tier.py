"""The shared conformance suite of the :class:`~kvstrata.kvstore.tier.Tier` contract.

Every tier (host, device, disk, remote) passes this one suite, directly and through the fault-injecting
wrapper of ``tests/kvstore/faulty.py``. This module is not collected by itself (its name does not start
with ``test_``); a tier's own test module subclasses :class:`TierConformance`::

    from tests.kvstore.conformance_tier import TierConformance

    class TestHostTierConformance(TierConformance):
        chunk_bytes = 4096                      # size of the chunks the suite stores (default 4096)

        def make_tier(self, capacity_bytes: int) -> Tier:
            return HostTier(capacity_bytes, slot_bytes=self.chunk_bytes)

        # Optional: the capacity that holds exactly ``n`` of the suite's chunks. The default is
        # ``n * chunk_bytes``; a tier that charges per-chunk overhead (the disk tier's file header)
        # overrides it.
        def capacity_for(self, n: int) -> int:
            return n * self.chunk_bytes

``make_tier`` may use ``self.tmp_path`` (a fresh directory per test). Every tier it returns is closed after
the test. To run the suite through the fault-injecting wrapper, see :class:`tests.kvstore.faulty.
FaultyTierConformance`.

What the suite pins down, beyond the module docstring of ``kvstrata/kvstore/tier.py``:

- ``get(key, out=...)`` with an ``out`` smaller than the chunk raises :class:`InvalidArgumentError`.
- A chunk larger than the tier's whole capacity raises :class:`ChunkTooLargeError`.
- ``get`` without ``out`` returns a tensor the caller owns: changing it does not change the stored chunk,
  and changing the source after ``put`` does not either.
- ``victims`` counts sizes in the tier's own charging unit: ``capacity_for(1)`` bytes free one chunk.
- A failed put (``TierFullError``) leaves the tier as it was.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstrata.core.chunk import ChunkMeta
from kvstrata.core.keys import ChunkKey
from kvstrata.errors import (
    ChunkTooLargeError,
    InvalidArgumentError,
    StoreError,
    TierFullError,
)
from kvstrata.kvstore.tier import Tier, TierEvent

__all__ = ["TierConformance", "check_stamped", "chunk_key", "pattern", "stamped"]


def chunk_key(i: int, salt: bytes = b"") -> bytes:
    """A deterministic 16-byte chunk key."""
    return hashlib.blake2b(salt + i.to_bytes(8, "little"), digest_size=16).digest()


def pattern(key: bytes, nbytes: int, version: int = 0) -> torch.Tensor:
    """Deterministic bytes that differ between keys and versions (so a mix-up is visible)."""
    seed = int.from_bytes(
        hashlib.blake2b(key + version.to_bytes(4, "little"), digest_size=8).digest(), "little"
    )
    gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def stamped(key: bytes, nbytes: int, version: int) -> torch.Tensor:
    """Bytes that carry their own key and version: [key 16][version u32][fill byte ...]."""
    data = torch.empty(nbytes, dtype=torch.uint8)
    data[:16] = torch.frombuffer(bytearray(key), dtype=torch.uint8)
    data[16:20] = torch.frombuffer(bytearray(version.to_bytes(4, "little")), dtype=torch.uint8)
    data[20:] = (key[0] ^ version) & 0xFF
    return data


def check_stamped(key: bytes, data: torch.Tensor) -> int:
    """Assert that ``data`` is a complete :func:`stamped` chunk of ``key``; return its version."""
    raw = data.numpy().tobytes()
    assert raw[:16] == key, "a chunk came back under another key"
    version = int.from_bytes(raw[16:20], "little")
    fill = (key[0] ^ version) & 0xFF
    assert raw[20:] == bytes([fill]) * (len(raw) - 20), "a chunk came back torn or corrupt"
    return version


def meta_for(key: bytes, nblocks: int = 2) -> ChunkMeta:
    """A ChunkMeta with ``nblocks`` block keys derived from ``key`` (the last one is the key itself)."""
    blocks = tuple(hashlib.blake2b(key + bytes([b]), digest_size=16).digest() for b in range(nblocks - 1))
    return ChunkMeta(block_keys=(*blocks, key), fingerprint=bytes(range(16)), codec="none", num_tokens=32)


def as_bytes(data: torch.Tensor | None) -> bytes:
    """The bytes of a result tensor (``None`` stays ``None``)."""
    assert data is not None, "expected a hit, got a miss"
    assert data.dtype == torch.uint8 and data.dim() == 1, "get returns a 1-D uint8 tensor"
    return data.numpy().tobytes()


class TierConformance:
    """The Tier contract as tests. Subclass it in a ``test_*.py`` module as ``Test...`` (see module doc)."""

    #: size of the chunks the suite stores; the tier must accept chunks up to this size
    chunk_bytes: int = 4096
    #: a fresh directory for this test (set before make_tier is called)
    tmp_path: Path

    # -- hooks for subclasses ---------------------------------------------------------------------
    def make_tier(self, capacity_bytes: int) -> Tier:
        """A fresh, empty tier that may hold ``capacity_bytes`` (chunks up to ``chunk_bytes`` each)."""
        raise NotImplementedError

    def capacity_for(self, n: int) -> int:
        """The capacity that holds exactly ``n`` of the suite's chunks (``chunk_bytes`` each)."""
        return n * self.chunk_bytes

    # -- plumbing ---------------------------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _conformance_env(self, tmp_path: Path) -> Iterator[None]:
        self.tmp_path = tmp_path
        self._made: list[Tier] = []
        yield
        for tier in self._made:
            try:
                tier.close()
            except Exception:
                pass

    def tier(self, chunks: int = 16) -> Tier:
        """A fresh tier sized for ``chunks`` of the suite's chunks; closed after the test."""
        tier = self.make_tier(self.capacity_for(chunks))
        self._made.append(tier)
        return tier

    def data(self, key: bytes, version: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """The suite's bytes for ``key``."""
        return pattern(key, self.chunk_bytes if nbytes is None else nbytes, version)

    # -- round trips ------------------------------------------------------------------------------
    def test_put_get_round_trip(self) -> None:
        tier = self.tier()
        key = chunk_key(1)
        data = self.data(key)
        tier.put(key, data, meta_for(key))
        got = tier.get(key)
        assert as_bytes(got) == data.numpy().tobytes()
        assert tier.contains(key)
        assert tier.size_of(key) == self.chunk_bytes
        assert len(tier) == 1

    def test_round_trip_of_smaller_chunks(self) -> None:
        tier = self.tier()
        for i, nbytes in enumerate((1, 17, self.chunk_bytes // 3, self.chunk_bytes - 1)):
            key = chunk_key(i)
            data = self.data(key, nbytes=nbytes)
            tier.put(key, data)
            assert tier.size_of(key) == nbytes
            assert as_bytes(tier.get(key)) == data.numpy().tobytes()

    def test_tensor_inputs_of_any_dtype(self) -> None:
        tier = self.tier()
        key = chunk_key(2)
        src = torch.randn(self.chunk_bytes // 4, dtype=torch.float32).reshape(4, -1)
        tier.put(key, src)
        got = tier.get(key)
        assert got is not None
        assert torch.equal(got.view(torch.float32).reshape(4, -1), src)
        half = torch.randn(self.chunk_bytes // 2, dtype=torch.float16)
        tier.put(chunk_key(3), half)
        got = tier.get(chunk_key(3))
        assert got is not None and torch.equal(got.view(torch.float16), half)

    def test_buffer_inputs(self) -> None:
        tier = self.tier()
        raw = self.data(chunk_key(4)).numpy().tobytes()
        inputs: list[object] = [
            raw,
            bytearray(raw),
            memoryview(raw),
            np.frombuffer(raw, dtype=np.uint8).copy(),
        ]
        for i, buf in enumerate(inputs):
            key = chunk_key(100 + i)
            tier.put(key, buf)
            assert as_bytes(tier.get(key)) == raw, f"input type {type(buf).__name__}"

    def test_non_contiguous_tensor_is_refused(self) -> None:
        tier = self.tier()
        src = torch.zeros(64, 64, dtype=torch.uint8).t()
        with pytest.raises(InvalidArgumentError):
            tier.put(chunk_key(5), src)
        assert not tier.contains(chunk_key(5))

    def test_get_into_out_tensor(self) -> None:
        tier = self.tier()
        key = chunk_key(6)
        data = self.data(key)
        tier.put(key, data)
        out = torch.full((self.chunk_bytes + 100,), 7, dtype=torch.uint8)
        got = tier.get(key, out=out)
        assert got is not None
        assert got.numel() == self.chunk_bytes
        assert got.data_ptr() == out.data_ptr(), "the result is a view of out"
        assert torch.equal(out[: self.chunk_bytes], data)
        assert bool((out[self.chunk_bytes :] == 7).all()), "bytes past the chunk are left alone"

    def test_get_into_typed_out_tensor_and_buffer(self) -> None:
        tier = self.tier()
        key = chunk_key(7)
        data = self.data(key)
        tier.put(key, data)
        out_f32 = torch.zeros(self.chunk_bytes // 4, dtype=torch.float32)
        got = tier.get(key, out=out_f32)
        assert got is not None and got.dtype == torch.uint8
        assert out_f32.view(torch.uint8).numpy().tobytes() == data.numpy().tobytes()
        out_buf = bytearray(self.chunk_bytes)
        got = tier.get(key, out=out_buf)
        assert got is not None
        assert bytes(out_buf) == data.numpy().tobytes()

    def test_out_too_small_is_refused(self) -> None:
        tier = self.tier()
        key = chunk_key(8)
        tier.put(key, self.data(key))
        with pytest.raises(InvalidArgumentError):
            tier.get(key, out=torch.empty(self.chunk_bytes - 1, dtype=torch.uint8))
        assert tier.contains(key), "a refused get leaves the chunk in place"

    def test_result_and_source_are_not_aliased(self) -> None:
        tier = self.tier()
        key = chunk_key(9)
        src = self.data(key)
        expected = src.numpy().tobytes()
        tier.put(key, src)
        src.fill_(0)
        got = tier.get(key)
        assert as_bytes(got) == expected, "put stores a copy"
        assert got is not None
        got.fill_(1)
        assert as_bytes(tier.get(key)) == expected, "get returns a copy the caller owns"

    def test_miss_is_none(self) -> None:
        tier = self.tier()
        assert tier.get(chunk_key(10)) is None
        assert tier.get(chunk_key(10), out=torch.empty(self.chunk_bytes, dtype=torch.uint8)) is None
        assert tier.acquire(chunk_key(10)) is None
        assert not tier.contains(chunk_key(10))
        assert tier.size_of(chunk_key(10)) is None

    def test_replace(self) -> None:
        tier = self.tier()
        key = chunk_key(11)
        tier.put(key, self.data(key, 0))
        second = self.data(key, 1, nbytes=self.chunk_bytes // 2)
        tier.put(key, second)
        assert as_bytes(tier.get(key)) == second.numpy().tobytes()
        assert tier.size_of(key) == self.chunk_bytes // 2
        assert len(tier) == 1
        assert list(tier.keys()) == [key]

    def test_contains_and_remove(self) -> None:
        tier = self.tier()
        keys = [chunk_key(i) for i in range(3)]
        for key in keys:
            tier.put(key, self.data(key))
        used = tier.used_bytes
        assert tier.remove(keys[1]) is True
        assert tier.remove(keys[1]) is False
        assert not tier.contains(keys[1])
        assert tier.get(keys[1]) is None
        assert tier.contains(keys[0]) and tier.contains(keys[2])
        assert tier.used_bytes < used
        assert len(tier) == 2

    def test_chunk_key_objects_are_accepted(self) -> None:
        raw = chunk_key(12)
        key_obj = ChunkKey(digest=raw, block_keys=(raw,))
        tier = self.tier()
        tier.put(key_obj, self.data(raw))  # type: ignore[arg-type]
        assert tier.contains(raw)
        assert as_bytes(tier.get(key_obj)) == self.data(raw).numpy().tobytes()  # type: ignore[arg-type]

    # -- invalid arguments ------------------------------------------------------------------------
    @pytest.mark.parametrize("bad", [b"short", b"x" * 17, b"", "a" * 16, 12345, None])
    def test_invalid_keys(self, bad: object) -> None:
        tier = self.tier()
        data = self.data(chunk_key(0))
        with pytest.raises(InvalidArgumentError):
            tier.put(bad, data)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            tier.get(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            tier.contains(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            tier.remove(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            tier.acquire(bad)  # type: ignore[arg-type]
        assert len(tier) == 0

    def test_invalid_data(self) -> None:
        tier = self.tier()
        with pytest.raises(InvalidArgumentError):
            tier.put(chunk_key(13), object())
        assert len(tier) == 0

    # -- capacity ---------------------------------------------------------------------------------
    def test_chunk_too_large(self) -> None:
        tier = self.tier(2)
        key = chunk_key(14)
        tier.put(chunk_key(15), self.data(chunk_key(15)))
        with pytest.raises(ChunkTooLargeError):
            tier.put(key, torch.zeros(tier.capacity_bytes + 1, dtype=torch.uint8))
        assert not tier.contains(key)
        assert tier.contains(chunk_key(15)), "a refused chunk evicts nothing"

    def test_capacity_is_never_exceeded(self) -> None:
        tier = self.tier(4)
        assert tier.capacity_bytes >= 4 * self.chunk_bytes
        for i in range(13):
            key = chunk_key(i)
            tier.put(key, self.data(key))
            assert tier.used_bytes <= tier.capacity_bytes
            assert tier.contains(key), "the chunk just put is present"
        assert len(tier) == 4
        assert tier.stats.evictions == 9
        stored = tier.keys()
        for key in stored:
            assert as_bytes(tier.get(key)) == self.data(key).numpy().tobytes()

    def test_evict_false_raises_when_full(self) -> None:
        tier = self.tier(3)
        keys = [chunk_key(i) for i in range(4)]
        for key in keys[:3]:
            tier.put(key, self.data(key), evict=False)
        with pytest.raises(TierFullError):
            tier.put(keys[3], self.data(keys[3]), evict=False)
        assert not tier.contains(keys[3])
        assert all(tier.contains(k) for k in keys[:3]), "a refused put evicts nothing"
        assert tier.used_bytes <= tier.capacity_bytes
        # Room made by the caller (the Store's write-back path) lets the same put through.
        victims = tier.victims(self.capacity_for(1))
        assert victims == [keys[0]]
        tier.remove(victims[0])
        tier.put(keys[3], self.data(keys[3]), evict=False)
        assert tier.contains(keys[3])

    def test_eviction_drops_the_coldest(self) -> None:
        tier = self.tier(3)
        keys = [chunk_key(i) for i in range(4)]
        for key in keys[:3]:
            tier.put(key, self.data(key))
        assert tier.get(keys[0]) is not None  # keys[0] is now hot, keys[1] the coldest
        tier.put(keys[3], self.data(keys[3]))
        assert not tier.contains(keys[1])
        assert tier.contains(keys[0]) and tier.contains(keys[2]) and tier.contains(keys[3])

    def test_victims_order_and_pinned_exclusion(self) -> None:
        tier = self.tier(8)
        keys = [chunk_key(i) for i in range(4)]
        for key in keys:
            tier.put(key, self.data(key))
        assert tier.victims(0) == [] or tier.victims(0) == keys[:0]
        assert tier.victims(self.capacity_for(1)) == [keys[0]]
        assert tier.victims(self.capacity_for(2)) == keys[:2]
        assert tier.victims(self.capacity_for(4)) == keys
        assert tier.contains(keys[0]) and len(tier) == 4, "victims only lists; it removes nothing"
        handle = tier.acquire(keys[0])
        assert handle is not None
        try:
            assert tier.victims(self.capacity_for(2)) == keys[1:3]
            assert keys[0] not in tier.victims(self.capacity_for(8))
        finally:
            handle.release()
        assert tier.victims(self.capacity_for(1)) in ([keys[0]], [keys[1]])

    # -- pinning ----------------------------------------------------------------------------------
    def test_acquire_release(self) -> None:
        tier = self.tier()
        key = chunk_key(20)
        data = self.data(key)
        tier.put(key, data, meta_for(key))
        with tier.acquire(key) as handle:  # type: ignore[union-attr]
            assert handle.key == key
            assert handle.meta.block_keys == meta_for(key).block_keys
            assert handle.data.dtype == torch.uint8 and handle.data.numel() == self.chunk_bytes
            assert handle.data.numpy().tobytes() == data.numpy().tobytes()
        handle.release()  # idempotent
        assert tier.contains(key)

    def test_pinned_chunk_survives_eviction_unchanged(self) -> None:
        tier = self.tier(2)
        pinned = chunk_key(21)
        data = self.data(pinned)
        tier.put(pinned, data)
        handle = tier.acquire(pinned)
        assert handle is not None
        try:
            for i in range(6):
                key = chunk_key(200 + i)
                tier.put(key, self.data(key))
                assert tier.used_bytes <= tier.capacity_bytes
            assert tier.contains(pinned), "a pinned chunk is never evicted"
            assert handle.data.numpy().tobytes() == data.numpy().tobytes()
        finally:
            handle.release()
        assert pinned in tier.victims(tier.capacity_bytes), "once released it is evictable again"

    def test_pinned_data_unchanged_by_replace_and_remove(self) -> None:
        tier = self.tier(4)
        key = chunk_key(22)
        first = self.data(key, 0)
        tier.put(key, first)
        handle = tier.acquire(key)
        assert handle is not None
        try:
            second = self.data(key, 1)
            tier.put(key, second)
            assert handle.data.numpy().tobytes() == first.numpy().tobytes()
            assert as_bytes(tier.get(key)) == second.numpy().tobytes()
            tier.remove(key)
            assert not tier.contains(key)
            for i in range(4):  # reuse every free byte of the tier
                other = chunk_key(400 + i)
                tier.put(other, self.data(other))
            assert handle.data.numpy().tobytes() == first.numpy().tobytes()
        finally:
            handle.release()
        assert tier.used_bytes <= tier.capacity_bytes

    def test_all_pinned_raises_full(self) -> None:
        tier = self.tier(1)
        key = chunk_key(23)
        tier.put(key, self.data(key))
        handle = tier.acquire(key)
        assert handle is not None
        try:
            with pytest.raises(TierFullError):
                tier.put(chunk_key(24), self.data(chunk_key(24)))
            assert tier.contains(key)
            assert not tier.contains(chunk_key(24))
        finally:
            handle.release()
        tier.put(chunk_key(24), self.data(chunk_key(24)))
        assert tier.contains(chunk_key(24)) and not tier.contains(key)

    # -- events -----------------------------------------------------------------------------------
    def test_events_stored_and_removed(self) -> None:
        tier = self.tier(2)
        events: list[TierEvent] = []
        unsubscribe = tier.subscribe(events.append)
        keys = [chunk_key(i) for i in range(3)]
        tier.put(keys[0], self.data(keys[0]), meta_for(keys[0], 3))
        assert events[-1].kind == "stored" and events[-1].keys == (keys[0],)
        assert events[-1].block_keys == meta_for(keys[0], 3).block_keys
        assert events[-1].tier == tier.name
        tier.put(keys[1], self.data(keys[1]), meta_for(keys[1]))
        events.clear()
        tier.put(keys[2], self.data(keys[2]), meta_for(keys[2]))  # evicts keys[0]
        removed = [e for e in events if e.kind == "removed"]
        assert [k for e in removed for k in e.keys] == [keys[0]]
        assert [b for e in removed for b in e.block_keys] == list(meta_for(keys[0], 3).block_keys)
        stored = [e for e in events if e.kind == "stored"]
        assert [k for e in stored for k in e.keys] == [keys[2]]
        events.clear()
        tier.remove(keys[1])
        assert [(e.kind, e.keys, e.block_keys) for e in events] == [
            ("removed", (keys[1],), meta_for(keys[1]).block_keys)
        ]
        events.clear()
        tier.remove(keys[1])
        assert events == [], "removing an absent key emits nothing"
        tier.clear()
        assert events[-1].kind == "cleared"
        assert len(tier) == 0
        unsubscribe()
        events.clear()
        tier.put(keys[0], self.data(keys[0]))
        assert events == []

    def test_failing_listener_does_not_break_the_tier(self) -> None:
        tier = self.tier()
        seen: list[TierEvent] = []

        def bad(event: TierEvent) -> None:
            raise RuntimeError("listener bug")

        tier.subscribe(bad)
        tier.subscribe(seen.append)
        key = chunk_key(30)
        tier.put(key, self.data(key))
        assert tier.contains(key)
        assert seen and seen[-1].kind == "stored"

    def test_get_meta_round_trip_via_handle(self) -> None:
        tier = self.tier()
        key = chunk_key(31)
        meta = ChunkMeta(block_keys=(key,), fingerprint=b"\x01" * 16, codec="int8", num_tokens=256)
        tier.put(key, self.data(key), meta)
        handle = tier.acquire(key)
        assert handle is not None
        with handle:
            assert handle.meta == meta

    # -- keys, stats, lifecycle -------------------------------------------------------------------
    def test_keys_is_a_snapshot(self) -> None:
        tier = self.tier()
        keys = [chunk_key(i) for i in range(5)]
        for key in keys:
            tier.put(key, self.data(key))
        assert sorted(tier.keys()) == sorted(keys)
        snapshot = tier.keys()
        for key in snapshot:  # removing while iterating must not break the iteration
            tier.remove(key)
        assert list(tier.keys()) == []
        assert tier.used_bytes == 0 and len(tier) == 0

    def test_stats_counters(self) -> None:
        tier = self.tier()
        key = chunk_key(40)
        base = tier.snapshot()
        tier.put(key, self.data(key))
        assert tier.get(key) is not None
        assert tier.get(chunk_key(41)) is None
        assert tier.get(chunk_key(42)) is None
        snap = tier.snapshot()
        assert snap.hits - base.hits == 1
        assert snap.misses - base.misses == 2
        assert snap.puts - base.puts == 1
        assert snap.bytes_written - base.bytes_written == self.chunk_bytes
        assert snap.bytes_read - base.bytes_read == self.chunk_bytes
        assert snap.chunks == 1
        assert snap.bytes_used == tier.used_bytes > 0
        assert snap.capacity_bytes == tier.capacity_bytes
        assert tier.contains(key)
        assert tier.snapshot().hits == snap.hits, "contains is not an access"

    def test_close(self) -> None:
        tier = self.tier()
        key = chunk_key(50)
        tier.put(key, self.data(key))
        tier.close()
        with pytest.raises(StoreError):
            tier.put(chunk_key(51), self.data(chunk_key(51)))
        with pytest.raises(StoreError):
            tier.get(key)

    # -- concurrency ------------------------------------------------------------------------------
    def test_thread_safety_smoke(self) -> None:
        tier = self.tier(6)
        keys = [chunk_key(i, b"threads") for i in range(12)]
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            out = torch.empty(self.chunk_bytes, dtype=torch.uint8)
            try:
                for step in range(150):
                    if stop.is_set():
                        return
                    key = rng.choice(keys)
                    op = rng.random()
                    if op < 0.4:
                        try:
                            tier.put(key, stamped(key, self.chunk_bytes, seed * 1000 + step))
                        except TierFullError:
                            pass  # everything evictable was pinned by the other threads
                    elif op < 0.65:
                        got = tier.get(key, out=out if rng.random() < 0.5 else None)
                        if got is not None:
                            check_stamped(key, got)
                    elif op < 0.85:
                        handle = tier.acquire(key)
                        if handle is not None:
                            with handle:
                                check_stamped(key, handle.data)
                                check_stamped(key, handle.data)
                    elif op < 0.95:
                        tier.remove(key)
                    else:
                        tier.victims(self.capacity_for(2))
                        list(tier.keys())
                    assert tier.used_bytes <= tier.capacity_bytes
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        if errors:
            raise errors[0]
        assert tier.used_bytes <= tier.capacity_bytes
        assert len(tier) <= 6
        remaining = tier.keys()
        for key in remaining:
            got = tier.get(key)
            if got is not None:
                check_stamped(key, got)
