"""A fault-injecting :class:`Tier` wrapper, and the conformance suite run through it.

``FaultyTier(inner)`` forwards every call to a real tier and, when told to, makes it fail the way media
fail: a write that does not happen (:class:`TierIOError`), a read that fails (:class:`TierIOError`), a read
that returns damaged bytes, or an operation that is slow. Faults are switched on explicitly
(``fail_writes``, ``fail_reads``, ``corrupt_reads``, ``delay_s``) or drawn with a seeded probability
(``write_fail_p``, ``read_fail_p``, ``corrupt_p``), so a failing run can be replayed.

Damaged reads are caught the way a real tier catches them: the wrapper keeps a checksum of every chunk it
stored and verifies every read against it; a mismatch drops the chunk, counts an error and is reported as
a miss (``None``). So whatever the faults, a caller sees exact bytes, a miss, or a typed error — never wrong
data. That is what :class:`FaultyTierConformance` checks.

Running a tier's conformance suite through the wrapper (in the tier's own test module)::

    from tests.kvstore.faulty import FaultyTierConformance

    class TestHostTierThroughFaults(FaultyTierConformance):
        chunk_bytes = 4096

        def make_inner(self, capacity_bytes: int) -> Tier:
            return HostTier(capacity_bytes, slot_bytes=self.chunk_bytes)

This runs the whole :class:`~tests.kvstore.conformance_tier.TierConformance` suite on ``FaultyTier(inner)``
with faults off (the wrapper must be transparent), plus the ``test_fault_*`` tests, which switch faults on.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest
import torch

from kvstrata.core.buffers import BufferLike, as_byte_tensor
from kvstrata.core.chunk import EMPTY_META, ChunkHandle, ChunkMeta, check_key
from kvstrata.errors import TierIOError
from kvstrata.kvstore.tier import Tier, TierEvent, TierListener
from tests.kvstore.conformance_tier import TierConformance, check_stamped, chunk_key, stamped

__all__ = ["FaultyTier", "FaultyTierConformance"]

#: checksums remembered per key: enough for the versions concurrent writers can have in flight
_VERSIONS_KEPT = 8


def _crc(data: torch.Tensor) -> int:
    if data.numel() == 0:
        return 0
    return zlib.crc32(data.cpu().numpy().data)


class FaultyTier(Tier):
    """A :class:`Tier` that forwards to ``inner`` and injects faults (see the module docstring).

    Switches (plain attributes, may be flipped at any time): ``fail_writes``, ``fail_reads``,
    ``corrupt_reads`` (booleans) and ``delay_s`` (seconds added to every call). Probabilities, drawn from a
    ``random.Random(seed)``: ``write_fail_p``, ``read_fail_p``, ``corrupt_p``. ``injected`` counts the faults
    injected so far, by kind.
    """

    def __init__(
        self,
        inner: Tier,
        *,
        seed: int = 0,
        write_fail_p: float = 0.0,
        read_fail_p: float = 0.0,
        corrupt_p: float = 0.0,
        delay_s: float = 0.0,
    ) -> None:
        self.name = inner.name
        self.shared = inner.shared  # type: ignore[misc]
        self.catalog_meta = inner.catalog_meta  # type: ignore[misc]
        super().__init__()
        self.inner = inner
        # One set of counters: the inner tier counts hits and misses, the wrapper adds the errors it finds.
        self.stats = inner.stats
        self.fail_writes = False
        self.fail_reads = False
        self.corrupt_reads = False
        self.delay_s = delay_s
        self.write_fail_p = write_fail_p
        self.read_fail_p = read_fail_p
        self.corrupt_p = corrupt_p
        self.injected = {"write": 0, "read": 0, "corrupt": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sums: dict[bytes, list[int]] = {}
        inner.subscribe(self._forget_removed)

    # -- fault plumbing ---------------------------------------------------------------------------
    def _fault(self, kind: str) -> bool:
        switch, p = {
            "write": (self.fail_writes, self.write_fail_p),
            "read": (self.fail_reads, self.read_fail_p),
            "corrupt": (self.corrupt_reads, self.corrupt_p),
        }[kind]
        with self._lock:
            hit = switch or (p > 0 and self._rng.random() < p)
            if hit:
                self.injected[kind] += 1
        return hit

    def _delay(self) -> None:
        if self.delay_s > 0:
            time.sleep(self.delay_s)

    def _forget_removed(self, event: TierEvent) -> None:
        if event.kind == "cleared":
            with self._lock:
                self._sums.clear()

    def _remember(self, key: bytes, crc: int) -> None:
        with self._lock:
            sums = self._sums.setdefault(key, [])
            sums.append(crc)
            del sums[:-_VERSIONS_KEPT]

    def _intact(self, key: bytes, data: torch.Tensor) -> bool:
        with self._lock:
            sums = list(self._sums.get(key, ()))
        # A chunk this wrapper did not store (put straight into the inner tier) cannot be checked here.
        return not sums or _crc(data) in sums

    def _drop_corrupt(self, key: bytes) -> None:
        self._count("errors")
        self.inner.remove(key)

    # -- the contract -----------------------------------------------------------------------------
    def put(self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META, *, evict: bool = True) -> None:
        """Forward the put, or fail it before anything is written (the old value, if any, stays)."""
        key = check_key(key)
        tensor = as_byte_tensor(data)
        self._delay()
        if self._fault("write"):
            self._count("errors")
            raise TierIOError("injected write failure")
        self._remember(key, _crc(tensor))
        self.inner.put(key, tensor, meta, evict=evict)

    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """Forward the get; an injected read failure raises, an injected corruption is caught as a miss."""
        key = check_key(key)
        self._delay()
        if self._fault("read"):
            self._count("errors")
            raise TierIOError("injected read failure")
        result = self.inner.get(key, out)
        if result is None:
            return None
        if result.numel() and self._fault("corrupt"):
            # The result is the caller's memory (a new tensor or a view of ``out``), never the tier's.
            result[result.numel() // 2] ^= 0x5A
        if not self._intact(key, result):
            self._drop_corrupt(key)
            return None
        return result

    def acquire(self, key: bytes) -> ChunkHandle | None:
        """Forward the acquire; faults as in :meth:`get` (a damaged chunk is released and dropped)."""
        key = check_key(key)
        self._delay()
        if self._fault("read"):
            self._count("errors")
            raise TierIOError("injected read failure")
        handle = self.inner.acquire(key)
        if handle is None:
            return None
        seen = handle.data
        if seen.numel() and self._fault("corrupt"):
            # Damage a copy: handle.data of a memory tier is the pooled slot other readers may share.
            seen = seen.clone()
            seen[seen.numel() // 2] ^= 0x5A
        if not self._intact(key, seen):
            handle.release()
            self._drop_corrupt(key)
            return None
        return handle

    def contains(self, key: bytes) -> bool:
        """Forwarded."""
        return self.inner.contains(key)

    def remove(self, key: bytes) -> bool:
        """Forwarded."""
        return self.inner.remove(key)

    def victims(self, num_bytes: int) -> list[bytes]:
        """Forwarded."""
        return self.inner.victims(num_bytes)

    def keys(self) -> Iterator[bytes]:
        """Forwarded."""
        return self.inner.keys()

    def size_of(self, key: bytes) -> int | None:
        """Forwarded."""
        return self.inner.size_of(key)

    @property
    def capacity_bytes(self) -> int:
        """Forwarded."""
        return self.inner.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Forwarded."""
        return self.inner.used_bytes

    def __len__(self) -> int:
        return len(self.inner)

    def clear(self) -> None:
        """Forwarded (the inner tier emits the ``cleared`` event)."""
        self.inner.clear()

    def close(self) -> None:
        """Forwarded."""
        self.inner.close()

    def subscribe(self, listener: TierListener) -> Callable[[], None]:
        """Events come from the inner tier."""
        return self.inner.subscribe(listener)

    # Capabilities of the contract: the inner tier's answers (reads through them are not faulted).
    def victims_for(self, num_bytes: int) -> list[bytes]:
        """Forwarded."""
        return self.inner.victims_for(num_bytes)

    def fits(self, num_bytes: int) -> bool:
        """Forwarded."""
        return self.inner.fits(num_bytes)

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """Forwarded."""
        return self.inner.get_meta(key)

    def memory_region(self) -> torch.Tensor | None:
        """Forwarded."""
        return self.inner.memory_region()

    def __getattr__(self, name: str) -> object:
        # Extras beyond the contract (get_meta, slot_span, path_of, ...) are the inner tier's, unfaulted.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class FaultyTierConformance(TierConformance):
    """The conformance suite on ``FaultyTier(make_inner(...))``, plus tests with faults switched on."""

    #: the seed of the wrapper's fault draws
    fault_seed: int = 1234

    def make_inner(self, capacity_bytes: int) -> Tier:
        """The real tier under the wrapper (subclasses implement it)."""
        raise NotImplementedError

    def make_tier(self, capacity_bytes: int) -> Tier:
        """The wrapped tier, faults off: the whole base suite must pass through it unchanged."""
        return FaultyTier(self.make_inner(capacity_bytes), seed=self.fault_seed)

    def faulty(self, chunks: int = 16) -> FaultyTier:
        """A fresh wrapped tier (typed)."""
        tier = self.tier(chunks)
        assert isinstance(tier, FaultyTier)
        return tier

    def test_fault_failed_write_raises_and_keeps_the_old_value(self) -> None:
        tier = self.faulty()
        key, fresh = chunk_key(1), chunk_key(2)
        tier.put(key, self.data(key, 0))
        tier.fail_writes = True
        with pytest.raises(TierIOError):
            tier.put(key, self.data(key, 1))
        with pytest.raises(TierIOError):
            tier.put(fresh, self.data(fresh))
        assert not tier.contains(fresh), "a failed put leaves no chunk"
        assert tier.stats.errors >= 2
        tier.fail_writes = False
        got = tier.get(key)
        assert got is not None and torch.equal(got, self.data(key, 0))

    def test_fault_failed_read_raises_typed_and_loses_nothing(self) -> None:
        tier = self.faulty()
        key = chunk_key(3)
        tier.put(key, self.data(key))
        tier.fail_reads = True
        with pytest.raises(TierIOError):
            tier.get(key)
        with pytest.raises(TierIOError):
            tier.acquire(key)
        tier.fail_reads = False
        got = tier.get(key)
        assert got is not None and torch.equal(got, self.data(key))

    def test_fault_corrupt_read_is_a_counted_miss(self) -> None:
        tier = self.faulty()
        key, other = chunk_key(4), chunk_key(5)
        tier.put(key, self.data(key))
        tier.put(other, self.data(other))
        errors = tier.stats.errors
        tier.corrupt_reads = True
        out = torch.empty(self.chunk_bytes, dtype=torch.uint8)
        assert tier.get(key, out=out) is None
        assert tier.stats.errors == errors + 1
        assert not tier.contains(key), "a corrupt chunk is dropped"
        assert tier.acquire(other) is None
        assert not tier.contains(other)
        tier.corrupt_reads = False
        assert tier.get(key) is None

    def test_fault_slow_operations_stay_correct(self) -> None:
        tier = self.faulty()
        tier.delay_s = 0.002
        key = chunk_key(6)
        start = time.monotonic()
        tier.put(key, self.data(key))
        got = tier.get(key)
        assert time.monotonic() - start >= 0.004
        assert got is not None and torch.equal(got, self.data(key))

    def test_fault_random_faults_never_give_wrong_data(self) -> None:
        inner = self.make_inner(self.capacity_for(6))
        tier = FaultyTier(inner, seed=self.fault_seed, write_fail_p=0.15, read_fail_p=0.1, corrupt_p=0.1)
        self._made.append(tier)
        rng = random.Random(self.fault_seed)
        keys = [chunk_key(i, b"random-faults") for i in range(10)]
        latest: dict[bytes, int] = {}
        outcomes = {"hit": 0, "miss": 0, "error": 0}
        for step in range(300):
            key = rng.choice(keys)
            if rng.random() < 0.45:
                try:
                    tier.put(key, stamped(key, self.chunk_bytes, step))
                    latest[key] = step
                except TierIOError:
                    outcomes["error"] += 1
                continue
            try:
                if rng.random() < 0.5:
                    got = tier.get(key)
                    version = None if got is None else check_stamped(key, got)
                else:
                    handle = tier.acquire(key)
                    version = None
                    if handle is not None:
                        with handle:
                            version = check_stamped(key, handle.data)
            except TierIOError:
                outcomes["error"] += 1
                continue
            if version is None:
                outcomes["miss"] += 1
            else:
                outcomes["hit"] += 1
                assert version == latest.get(key), "a read returned a stale or foreign version"
            assert tier.used_bytes <= tier.capacity_bytes
        assert all(outcomes.values()), f"the workload exercised hits, misses and errors: {outcomes}"
        assert tier.injected["corrupt"] > 0 and tier.stats.errors >= sum(tier.injected.values())
