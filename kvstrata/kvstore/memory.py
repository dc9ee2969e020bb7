"""The memory tiers' common engine: chunks in the slots of one :class:`SlotPool`, under one lock.

A put reserves a slot under the lock (evicting if allowed), copies the bytes into it outside the lock, and
publishes the entry under the lock again; a get pins the entry under the lock, copies out of the slot
outside it, and unpins. The lock thus covers only O(1) bookkeeping and copies of different chunks run in
parallel. A pinned slot is never handed out again: removing or replacing a pinned chunk hides it at once and
frees its slot when the last pin is released.

Capacity is counted in slots: every chunk takes one whole slot, so ``used_bytes`` is the slots held times
``slot_bytes`` (the memory really held) and ``victims(n)`` frees ``ceil(n / slot_bytes)`` slots. Choose
``slot_bytes`` equal to the chunk size of the layout served (the largest chunk the tier may hold).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError, StoreError, TierFullError, TierIOError
from kvstrata.kvstore.eviction import make_policy
from kvstrata.kvstore.pool import SlotPool
from kvstrata.kvstore.tier import (
    EMPTY_META,
    BufferLike,
    ChunkHandle,
    ChunkMeta,
    Tier,
    as_byte_tensor,
    check_key,
)

__all__ = ["PooledTier"]


def _as_bytes(data: BufferLike) -> torch.Tensor:
    # The hot path's common case, a flat uint8 tensor, needs no new view object.
    if (
        isinstance(data, torch.Tensor)
        and data.dtype == torch.uint8
        and data.dim() == 1
        and data.is_contiguous()
    ):
        return data
    return as_byte_tensor(data)


class _Entry:
    __slots__ = ("dead", "length", "meta", "pins", "slot")

    def __init__(self, slot: int, length: int, meta: ChunkMeta) -> None:
        self.slot = slot
        self.length = length
        self.meta = meta
        self.pins = 0
        self.dead = False


class PooledTier(Tier):
    """A tier whose chunks live in the fixed-size slots of one preallocated buffer (see the module doc)."""

    def __init__(self, pool: SlotPool, *, policy: str = "lru") -> None:
        super().__init__()
        self._pool = pool
        self._policy = make_policy(policy)
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._closed = False

    # -- helpers (call with the lock held unless noted) ----------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the {self.name} tier is closed")

    def _drop(self, key: bytes, entry: _Entry) -> None:
        """Forget ``entry``; its slot goes back to the pool now, or when its last pin is released."""
        del self._entries[key]
        self._policy.remove(key)
        entry.dead = True
        if entry.pins == 0:
            self._pool.free(entry.slot)

    def _reserve(self, evict: bool, evicted: list[tuple[bytes, ChunkMeta]]) -> int:
        slot = self._pool.alloc()
        if slot is not None:
            return slot
        if not evict:
            raise TierFullError(f"the {self.name} tier is full ({self._pool.num_slots} slots)")
        for victim in self._policy.candidates():
            entry = self._entries[victim]
            if entry.pins:
                continue
            self._drop(victim, entry)
            evicted.append((victim, entry.meta))
            self._count("evictions")
            slot = self._pool.alloc()
            if slot is not None:
                return slot
        raise TierFullError(f"the {self.name} tier is full and every chunk in it is pinned")

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0 and entry.dead:
                self._pool.free(entry.slot)

    # -- the Tier contract ---------------------------------------------------------------------------
    def put(
        self,
        key: bytes,
        data: BufferLike,
        meta: ChunkMeta = EMPTY_META,
        *,
        evict: bool = True,
        if_absent: bool = False,
    ) -> None:
        """Copy ``data`` into a slot (see :meth:`Tier.put`).

        ``if_absent=True`` (the Store promoting a chunk) keeps a value that another thread stored meanwhile
        instead of replacing it with this, possibly older, one.
        """
        key = check_key(key)
        src = _as_bytes(data)
        length = src.numel()
        if length > self._pool.slot_bytes:
            raise ChunkTooLargeError(
                f"a {length}-byte chunk exceeds the {self.name} tier's slots ({self._pool.slot_bytes} bytes)"
            )
        evicted: list[tuple[bytes, ChunkMeta]] = []
        try:
            with self._lock:
                self._check_open()
                slot = self._reserve(evict, evicted)
        finally:
            # Listeners run outside the lock; the victims are gone whatever happens to this put.
            if evicted:
                self._emit_removed([k for k, _ in evicted], [m for _, m in evicted])
        try:
            self._pool.view(slot, length).copy_(src)
        except Exception as exc:
            with self._lock:
                self._pool.free(slot)
                self._count("errors")
            raise TierIOError(f"copy into the {self.name} tier failed: {exc}") from exc
        entry = _Entry(slot, length, meta)
        with self._lock:
            if self._closed:
                raise StoreError(f"the {self.name} tier is closed")
            old = self._entries.get(key)
            if old is not None:
                if if_absent:
                    self._pool.free(slot)
                    return
                self._drop(key, old)
            self._entries[key] = entry
            self._policy.insert(key, length)
            self._count("puts")
            self._count("bytes_written", length)
        if self._listeners:  # skip building the event when nobody listens (a read of a list is atomic)
            self._emit_stored([key], [meta])

    def _pin(self, key: bytes, count: bool = True) -> _Entry | None:
        with self._lock:
            self._check_open()
            entry = self._entries.get(key)
            if entry is None:
                if count:
                    self._count("misses")
                return None
            entry.pins += 1
            if count:
                self._policy.touch(key)
                self._count("hits")
                self._count("bytes_read", entry.length)
            return entry

    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """Copy the chunk out of its slot (see :meth:`Tier.get`)."""
        key = check_key(key)
        dst: torch.Tensor | None = None
        if out is not None:
            dst = _as_bytes(out)
        entry = self._pin(key)
        if entry is None:
            return None
        try:
            if dst is not None and dst.numel() < entry.length:
                raise InvalidArgumentError(f"out holds {dst.numel()} bytes, the chunk {entry.length}")
            src = self._pool.view(entry.slot, entry.length)
            try:
                if dst is None:
                    return src.clone()
                result = dst if dst.numel() == entry.length else dst[: entry.length]
                result.copy_(src)
                return result
            except Exception as exc:
                with self._lock:
                    self._count("errors")
                raise TierIOError(f"copy out of the {self.name} tier failed: {exc}") from exc
        finally:
            self._unpin(entry)

    def acquire(self, key: bytes, *, count: bool = True) -> ChunkHandle | None:
        """Pin the chunk; ``handle.data`` is a view of its slot, valid until released.

        ``count=False`` (the Store moving a chunk between tiers) neither counts a hit or miss nor refreshes
        the chunk's recency.
        """
        key = check_key(key)
        entry = self._pin(key, count)
        if entry is None:
            return None
        view = self._pool.view(entry.slot, entry.length)
        return ChunkHandle(key, view, entry.meta, lambda: self._unpin(entry))

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """The chunk's metadata, or ``None`` if absent (not an access)."""
        key = check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.meta

    def contains(self, key: bytes) -> bool:
        """Whether the chunk is stored (not an access)."""
        key = check_key(key)
        with self._lock:
            return key in self._entries

    def remove(self, key: bytes) -> bool:
        """Drop the chunk (its slot is reused once unpinned)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._drop(key, entry)
        self._emit_removed([key], [entry.meta])
        return True

    def victims(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys whose slots add up to at least ``num_bytes``."""
        needed = -(-num_bytes // self._pool.slot_bytes)
        out: list[bytes] = []
        if needed <= 0:
            return out
        with self._lock:
            for key in self._policy.candidates():
                if self._entries[key].pins:
                    continue
                out.append(key)
                if len(out) >= needed:
                    break
        return out

    def keys(self) -> Iterator[bytes]:
        """A snapshot of the stored keys."""
        with self._lock:
            return iter(list(self._entries))

    def size_of(self, key: bytes) -> int | None:
        """Stored bytes of the chunk, or ``None`` if absent."""
        key = check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.length

    def slot_span(self, key: bytes) -> tuple[int, int] | None:
        """Byte offset and length of the chunk inside the pool buffer (valid while pinned), or ``None``."""
        key = check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else (self._pool.offset(entry.slot), entry.length)

    @property
    def slot_bytes(self) -> int:
        """The largest chunk the tier holds; every chunk takes one slot of this size."""
        return self._pool.slot_bytes

    @property
    def buffer(self) -> torch.Tensor:
        """The pool buffer (offsets from :meth:`slot_span` are relative to it)."""
        return self._pool.buffer

    @property
    def capacity_bytes(self) -> int:
        """Slots times slot size."""
        return self._pool.num_slots * self._pool.slot_bytes

    @property
    def used_bytes(self) -> int:
        """Slots held (including removed chunks still pinned by readers) times slot size."""
        with self._lock:
            return self._pool.used_slots * self._pool.slot_bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Drop every chunk and release the pool; later calls raise :class:`StoreError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._entries.clear()
            self._pool.close()
