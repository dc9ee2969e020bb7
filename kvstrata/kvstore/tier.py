"""The ``Tier`` contract: one level of the tiered store (device, host, disk, remote).

Keys are 16-byte digests (:attr:`kvstrata.kvstore.keys.ChunkKey.digest`); a chunk is an opaque run of bytes
plus its :class:`ChunkMeta`. Every tier is thread-safe.

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
from typing import Any, Literal, Union

import msgspec
import torch

from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.keys import KEY_BYTES
from kvstrata.kvstore.metrics import TIER_METRICS

__all__ = [
    "EMPTY_META",
    "BufferLike",
    "ChunkHandle",
    "ChunkMeta",
    "ListenerSet",
    "Tier",
    "TierEvent",
    "TierListener",
    "TierStats",
    "as_byte_tensor",
    "check_key",
]

log = logging.getLogger(__name__)

#: What a put accepts: a contiguous torch tensor (any dtype, CPU or device) or any object with the buffer
#: protocol (bytes, bytearray, memoryview, numpy array).
BufferLike = Union[torch.Tensor, bytes, bytearray, memoryview, Any]


class ChunkMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What a tier keeps beside a chunk's bytes."""

    #: the block keys the chunk covers, reported in events (the index works in blocks)
    block_keys: tuple[bytes, ...] = ()
    #: the KV layout fingerprint the bytes were made for (16 bytes), or empty when not known
    fingerprint: bytes = b""
    #: the compression codec of the bytes: "none", "fp8", "int8"
    codec: str = "none"
    #: tokens covered by the chunk (0 when not known)
    num_tokens: int = 0
    #: the CRC-32C of the bytes when it was checked on the way in (a put over the wire), -1 when not known:
    #: the server answers a get with it instead of reading the whole chunk again, and a client that finds
    #: it does not match the bytes it received (corruption anywhere after the put) takes a miss
    crc32c: int = -1


EMPTY_META = ChunkMeta()


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


class ChunkHandle:
    """A pinned chunk. ``data`` stays valid and unchanged until :meth:`release`."""

    __slots__ = ("_release", "_released", "data", "key", "mem", "meta")

    def __init__(
        self,
        key: bytes,
        data: torch.Tensor,
        meta: ChunkMeta,
        release: Callable[[], None] | None = None,
        mem: memoryview | None = None,
    ) -> None:
        self.key = key
        self.data = data
        self.meta = meta
        #: ``data``'s bytes as a flat memoryview when the tier has one at hand (host memory), else ``None``
        self.mem = mem
        self._release = release
        self._released = False

    def release(self) -> None:
        """Unpin the chunk; idempotent."""
        if not self._released:
            self._released = True
            if self._release is not None:
                self._release()

    def __enter__(self) -> ChunkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_key(key: bytes) -> bytes:
    """Validate a chunk key (16 bytes) and return it as ``bytes``."""
    if not isinstance(key, bytes):
        digest = getattr(key, "digest", None)
        if isinstance(digest, bytes):
            key = digest
        elif isinstance(key, (bytearray, memoryview)):
            key = bytes(key)
        else:
            raise InvalidArgumentError(f"a chunk key is 16 bytes or a ChunkKey, not {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise InvalidArgumentError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
    return key


def as_byte_tensor(data: BufferLike) -> torch.Tensor:
    """View ``data`` as a flat uint8 tensor without copying (a tensor must be contiguous)."""
    if isinstance(data, torch.Tensor):
        if not data.is_contiguous():
            raise InvalidArgumentError("chunk data must be a contiguous tensor")
        if data.dtype is torch.uint8 and data.dim() == 1:
            return data  # already flat bytes (reshape + view cost microseconds per chunk)
        return data.reshape(-1).view(torch.uint8)
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise InvalidArgumentError(
            f"chunk data must be a tensor or a buffer, not {type(data).__name__}"
        ) from exc
    if not view.contiguous:
        raise InvalidArgumentError("chunk data must be a contiguous buffer")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    view = view.cast("B")
    if view.readonly:
        # torch.frombuffer warns on read-only buffers but only reads from them here.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


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
