"""The ``Tier`` contract: one level of the tiered store (device, host, disk, remote).

Keys are 16-byte digests (:attr:`kvstrata.core.keys.ChunkKey.digest`); a chunk is an opaque run of bytes
plus its :class:`~kvstrata.core.chunk.ChunkMeta`. Every tier is thread-safe.

Call order and semantics
------------------------
- ``put(key, data, meta, evict=True)`` stores a copy of ``data`` (a contiguous tensor or any buffer). Putting
  a key that is present replaces it. With ``evict=True`` the tier makes room by dropping its coldest
  unpinned chunks (its eviction policy decides); with ``evict=False`` it raises :class:`TierFullError`
  instead, so that the Store can demote victims first (write-back). Raises :class:`ChunkTooLargeError` for
  a chunk that can never fit, :class:`TierFullError` when everything evictable is pinned or the medium is
  full, :class:`TierIOError` when the medium fails. A failed put leaves no visible partial chunk.
- ``get(key, out=None)`` returns the chunk's bytes as a 1-D ``uint8`` tensor: copied into ``out`` (a
  contiguous tensor or buffer at least as large; the result is a view of ``out``) or into a new tensor.
  ``None`` means a miss and only a miss. A chunk whose checksum fails is dropped, counted as an error, and
  reported as a miss. Raises :class:`TierIOError` only when the medium itself fails.
- ``acquire(key)`` pins the chunk and returns a :class:`ChunkHandle` (``None`` on a miss). While a handle is
  held the chunk cannot be evicted or overwritten under the reader; for memory tiers ``handle.data`` is a
  zero-copy view of the pooled slot. Always ``release()`` it (it is a context manager).
- ``contains(key)`` answers without touching recency. ``remove(key)`` drops a chunk (a pinned chunk's
  memory is reused only after its last handle is released).
- ``victims(num_bytes)`` lists the coldest unpinned keys whose sizes add up to at least ``num_bytes``, in
  the order the eviction policy would drop them; the Store demotes them before removing them.
- ``keys()`` iterates a snapshot of the stored keys (recovery, index rebuilds).
- Capabilities with defaults, which a tier overrides where it can do better (the Store calls only these,
  never probes a tier's type): ``victims_for(num_bytes)`` the victims whose removal places one chunk of
  that size (default: ``victims``; a slab tier's free bytes are not always room for a chunk);
  ``fits(num_bytes)`` whether such a chunk would be placed now without evicting (default ``False``);
  ``get_meta(key)`` the chunk's metadata (default: a pin and a read; :attr:`Tier.catalog_meta` says
  whether it comes from a catalog, without a read); ``pin(key)`` a handle for moving the chunk between
  tiers, which counts no hit and refreshes no recency (default: ``acquire``); ``acquire_many(keys,
  max_bytes)`` handles for a prefix of ``keys`` within a byte budget (default: one ``acquire`` each);
  ``put_if_absent`` a put that never replaces a present value (default: ``contains`` then ``put``);
  ``memory_region()`` the one byte tensor every chunk lies in, if any. :attr:`Tier.shared` marks a tier
  that other instances share (remote): the Store does not drop its older copies of a key.
- ``subscribe(listener)`` registers a callable that receives every :class:`TierEvent`; listeners run on the
  thread that changed the tier, outside the tier's locks, and an exception in one is logged and ignored.
- ``close()`` releases the tier's resources; calls after it raise :class:`StoreError`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kvstrata.core.buffers import BufferLike
from kvstrata.core.chunk import EMPTY_META, ChunkHandle, ChunkMeta
from kvstrata.kvstore.metrics import TIER_METRICS

__all__ = ["ListenerSet", "Tier", "TierEvent", "TierListener", "TierStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TierEvent:
    """A change in a tier: chunks stored or removed, or the whole tier cleared."""

    kind: Literal["stored", "removed", "cleared"]
    tier: str
    keys: tuple[bytes, ...] = ()
    block_keys: tuple[bytes, ...] = ()


TierListener = Callable[[TierEvent], None]


@dataclass(slots=True)
class TierStats:
    """Counters of one tier since it was created (also exported to Prometheus)."""

    chunks: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    evictions: int = 0
    errors: int = 0


class ListenerSet:
    """A thread-safe set of event listeners and their fan-out (tiers and the Store share it).

    Listeners run on the emitting thread, outside the owner's locks; an exception in one is logged and
    ignored so that a faulty listener never breaks a tier. Truthy when anyone listens, so an owner can skip
    building events nobody reads.
    """

    __slots__ = ("_listeners", "_lock", "_owner")

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._listeners: tuple[TierListener, ...] = ()
        self._lock = threading.Lock()

    def add(self, listener: TierListener) -> Callable[[], None]:
        """Register ``listener``; returns a function that unregisters it."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    items = list(self._listeners)
                    items.remove(listener)
                    self._listeners = tuple(items)

        return remove

    def emit(self, event: TierEvent) -> None:
        """Call every listener with ``event``."""
        for listener in self._listeners:  # an immutable snapshot: no lock needed to read it
            try:
                listener(event)
            except Exception:
                log.exception("%s: event listener failed", self._owner)

    def __bool__(self) -> bool:
        return bool(self._listeners)


class Tier(ABC):
    """One level of the tiered store. See the module docstring for call order and failure semantics."""

    #: the tier's kind: "device", "host", "disk" or "remote"
    name: str = "tier"
    #: whether other instances share this tier's chunks (the remote tier): the Store leaves its copies of
    #: a key alone when a newer value lands in another tier
    shared: ClassVar[bool] = False
    #: whether :meth:`get_meta` answers from a catalog, without reading the chunk
    catalog_meta: ClassVar[bool] = False

    def __init__(self) -> None:
        self._listeners = ListenerSet(f"tier {self.name}")
        self.stats = TierStats()
        TIER_METRICS.track(self, self.name, self.stats)

    # -- the contract ------------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META, *, evict: bool = True) -> None:
        """Store a copy of ``data`` under ``key``."""

    @abstractmethod
    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """The chunk's bytes (into ``out`` when given), or ``None`` on a miss."""

    @abstractmethod
    def acquire(self, key: bytes) -> ChunkHandle | None:
        """Pin the chunk and return a handle on it, or ``None`` on a miss."""

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether the chunk is stored (does not count as an access)."""

    @abstractmethod
    def remove(self, key: bytes) -> bool:
        """Drop the chunk; ``True`` if it was present."""

    @abstractmethod
    def victims(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys that free at least ``num_bytes``, in eviction order."""

    @abstractmethod
    def keys(self) -> Iterator[bytes]:
        """A snapshot of the stored keys."""

    @abstractmethod
    def size_of(self, key: bytes) -> int | None:
        """Stored bytes of the chunk, or ``None`` if absent."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes the tier may hold."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes the tier holds now."""

    @abstractmethod
    def __len__(self) -> int:
        """Chunks stored."""

    # -- capabilities with defaults (see the module docstring) ----------------------------------------
    def victims_for(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys whose removal places one ``num_bytes`` chunk, in eviction order."""
        return self.victims(num_bytes)

    def fits(self, num_bytes: int) -> bool:
        """Whether a ``num_bytes`` chunk would be placed now without evicting (``False``: unknown)."""
        return False

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """The chunk's metadata, or ``None`` if absent (not an access)."""
        handle = self.pin(key)
        if handle is None:
            return None
        with handle:
            return handle.meta

    def pin(self, key: bytes) -> ChunkHandle | None:
        """Pin the chunk to move it to another tier: not a read, so no hit is counted and recency stays."""
        return self.acquire(key)

    def acquire_many(self, keys: Sequence[bytes], max_bytes: int) -> list[ChunkHandle | None]:
        """:meth:`acquire` of a prefix of ``keys``: it stops before a hit that would take the pinned bytes
        over ``max_bytes`` once there is at least one (the keys after the returned ones were not looked
        at)."""
        out: list[ChunkHandle | None] = []
        total = 0
        try:
            for key in keys:
                handle = self.acquire(key)
                if handle is not None:
                    size = handle.data.numel() * handle.data.element_size()
                    if total and total + size > max_bytes:
                        handle.release()
                        break
                    total += size
                out.append(handle)
        except BaseException:
            for handle in out:
                if handle is not None:
                    handle.release()
            raise
        return out

    def put_if_absent(
        self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META, *, evict: bool
    ) -> None:
        """:meth:`put` unless the key is present (a promotion must not replace a newer value)."""
        if not self.contains(key):
            self.put(key, data, meta, evict=evict)

    def memory_region(self) -> torch.Tensor | None:
        """The one byte tensor every chunk of this tier lies in (a memory pool), or ``None`` (disk, remote).

        Transports that hand out positions in it (shm, nixl) register or share exactly this memory.
        """
        return None

    def clear(self) -> None:
        """Drop every unpinned chunk and emit a ``cleared`` event."""
        for key in list(self.keys()):
            self.remove(key)
        self._emit(TierEvent("cleared", self.name))

    def close(self) -> None:  # noqa: B027 - optional hook; tiers with resources override it
        """Release the tier's resources."""

    # -- events and stats shared by every tier ------------------------------------------------------
    def subscribe(self, listener: TierListener) -> Callable[[], None]:
        """Call ``listener`` for every event of this tier; returns a function that unsubscribes it."""
        return self._listeners.add(listener)

    def _emit(self, event: TierEvent) -> None:
        self._listeners.emit(event)

    def _emit_stored(self, keys: Sequence[bytes], metas: Sequence[ChunkMeta]) -> None:
        if keys:
            blocks = tuple(b for m in metas for b in m.block_keys)
            self._emit(TierEvent("stored", self.name, tuple(keys), blocks))

    def _emit_removed(self, keys: Sequence[bytes], metas: Sequence[ChunkMeta]) -> None:
        if keys:
            blocks = tuple(b for m in metas for b in m.block_keys)
            self._emit(TierEvent("removed", self.name, tuple(keys), blocks))

    def _count(self, what: str, amount: int = 1) -> None:
        """Bump a counter in :attr:`stats` (hits, misses, puts, evictions, errors, ...); Prometheus reads them
        at scrape time (see :mod:`kvstrata.kvstore.metrics`)."""
        setattr(self.stats, what, getattr(self.stats, what) + amount)

    def snapshot(self) -> TierStats:
        """Current counters plus occupancy."""
        s = self.stats
        return TierStats(
            chunks=len(self),
            bytes_used=self.used_bytes,
            capacity_bytes=self.capacity_bytes,
            hits=s.hits,
            misses=s.misses,
            puts=s.puts,
            bytes_written=s.bytes_written,
            bytes_read=s.bytes_read,
            evictions=s.evictions,
            errors=s.errors,
        )
