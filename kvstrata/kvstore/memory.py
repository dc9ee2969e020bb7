"""The memory tiers' common engine: chunks in the slab-allocated slots of one :class:`SlotPool`, one lock.

A put reserves a slot under the lock (evicting if allowed), copies the bytes into it outside the lock, and
publishes the entry under the lock again: ``put`` is exactly :meth:`PooledTier.reserve`, a copy into the
reserved slot and :meth:`SlotReservation.commit`, and writers that can fill the slot themselves (a socket's
``recv_into``, a shared-memory client) call the three steps directly and save the copy. A get pins the
entry under the lock, copies out of the slot outside it, and unpins. The lock thus covers only O(1)
bookkeeping and copies of different chunks run in parallel. A pinned slot is never handed out again:
removing or replacing a pinned chunk hides it at once and frees its slot when the last pin is released.

Capacity is counted in the bytes of the slots held: a chunk takes one slot of the smallest size class that
holds it (see :mod:`kvstrata.kvstore.pool`: power-of-two classes up to ``slot_bytes``, the largest chunk the
tier holds), so ``used_bytes`` is the sum of those slot sizes (never above ``capacity_bytes``) and
``victims(n)`` lists the coldest unpinned chunks whose slots add up to ``n`` bytes.

Bytes free are not always room: a chunk needs a free slot of its own class or a wholly free page.
``fits(n)`` tells whether a chunk of ``n`` bytes would be placed now, and ``victims_for(n)`` which chunks
to remove so that it would be (the Store demotes exactly those). A put with ``evict=True`` evicts the same
set itself. That set is the shortest prefix of the policy order (pinned chunks skipped) that holds either one
chunk of the same class (its slot is reused at once) or every chunk of one page (the page is freed and
re-cut for the new class), and only those chunks are evicted: at most one chunk, or the chunks of one
page. A page holding a pinned slot is never freed this way; when no such set exists the put raises
:class:`TierFullError` and evicts nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from functools import partial

import torch

from kvstrata.core.buffers import BufferLike, as_byte_tensor
from kvstrata.core.chunk import EMPTY_META, ChunkHandle, ChunkMeta, check_key
from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError, StoreError, TierFullError, TierIOError
from kvstrata.kvstore.catalog import Catalog
from kvstrata.kvstore.eviction import make_policy
from kvstrata.kvstore.pool import SlotPool
from kvstrata.kvstore.tier import Tier

__all__ = ["PooledTier", "SlotReservation"]


class _Entry:
    __slots__ = ("dead", "length", "mem", "meta", "pins", "slot", "view")

    def __init__(
        self, slot: int, length: int, meta: ChunkMeta, view: torch.Tensor, mem: memoryview | None
    ) -> None:
        self.slot = slot  # the slot's byte offset in the pool buffer
        self.length = length
        self.meta = meta
        # The chunk's bytes in the pool (the pool's cached view of the slot): no narrow() per get.
        self.view = view
        self.mem = mem  # the same bytes as a memoryview (host pools), for socket I/O
        self.pins = 0
        self.dead = False


_RESERVED = 0
_DONE = 1


class SlotReservation:
    """A pinned, invisible slot of a :class:`PooledTier` reserved for one chunk (see
    :meth:`PooledTier.reserve`): fill :attr:`data`, then :meth:`commit` it, or :meth:`abort`.

    As a context manager it aborts on exit unless committed, so an exception (a short read, a closed
    connection, a failed checksum) never leaves a visible chunk or a leaked slot.
    """

    __slots__ = ("_state", "_tier", "data", "key", "mem", "meta", "nbytes", "offset")

    def __init__(
        self,
        tier: PooledTier,
        key: bytes,
        offset: int,
        nbytes: int,
        meta: ChunkMeta,
        data: torch.Tensor,
        mem: memoryview | None = None,
    ) -> None:
        self._tier = tier
        self._state = _RESERVED
        #: the chunk's key
        self.key = key
        #: the slot's byte offset in the tier's pool buffer (for writers that map the buffer: shm, nixl)
        self.offset = offset
        #: the chunk's length
        self.nbytes = nbytes
        #: the chunk's metadata, published with it
        self.meta = meta
        #: the writable uint8 view of exactly ``nbytes`` bytes of the slot
        self.data = data
        #: the same bytes as a flat writable memoryview (host pools; ``None`` on a device)
        self.mem = mem

    @property
    def active(self) -> bool:
        """Neither committed nor aborted yet."""
        return self._state == _RESERVED

    def commit(
        self, key: bytes | None = None, meta: ChunkMeta | None = None, *, if_absent: bool = False
    ) -> bool:
        """Publish the filled slot atomically as the chunk under :attr:`key`, replacing an older one.

        ``key`` and ``meta``, when given, replace those given to ``reserve`` (a writer that learns them
        only after writing: the shm and nixl put leases). ``if_absent=True`` keeps a value stored
        meanwhile and frees this slot instead (returns False). Raises :class:`InvalidArgumentError` if
        already committed or aborted (or for a bad key: the reservation stays active then),
        :class:`StoreError` if the tier was closed meanwhile (the reservation is over).
        """
        if key is not None:
            self.key = check_key(key)
        if meta is not None:
            self.meta = meta
        return self._tier._commit(self, if_absent)

    def abort(self) -> None:
        """Free the slot; nothing becomes visible. A no-op once committed or aborted."""
        self._tier._abort(self)

    def __enter__(self) -> SlotReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class PooledTier(Tier):
    """A tier whose chunks live in the size-classed slots of one preallocated buffer (see the module doc)."""

    catalog_meta = True

    def __init__(self, pool: SlotPool, *, policy: str = "lru") -> None:
        super().__init__()
        self._pool = pool
        self._lock = threading.Lock()
        # Capacity is counted in slots, so victims free their slots' class sizes; size_of is the payload.
        self._catalog: Catalog[_Entry] = Catalog(
            self._lock,
            make_policy(policy),
            charge=lambda e: pool.slot_size(e.slot),
            length=lambda e: e.length,
        )
        self._closed = False

    # -- helpers (call with the lock held unless noted) ----------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the {self.name} tier is closed")

    def _drop(self, key: bytes, entry: _Entry) -> None:
        """Forget ``entry``; its slot goes back to the pool now, or when its last pin is released."""
        self._catalog.pop(key)
        entry.dead = True
        if entry.pins == 0:
            self._pool.free(entry.slot)

    def _room_for(self, length: int) -> list[bytes] | None:
        """The chunks to evict so that a ``length``-byte chunk gets a slot (see the module docstring).

        ``[]`` when it fits now, ``None`` when no set of unpinned chunks makes room.
        """
        pool = self._pool
        if pool.can_alloc(length):
            return []
        wanted = pool.class_of(length)
        pending: dict[int, list[bytes]] = {}  # page -> its unpinned chunks seen so far, coldest first
        # Pinned chunks are skipped: their pages cannot be freed either, so their groups never complete.
        for key, entry in self._catalog.unpinned():
            if pool.class_at(entry.slot) == wanted:
                return [key]
            page = pool.page_of(entry.slot)
            group = pending.get(page)
            if group is None:
                group = pending[page] = []
            group.append(key)
            if len(group) == pool.page_used(page):
                return group
        return None

    def _reserve(self, length: int, evict: bool, evicted: list[tuple[bytes, ChunkMeta]]) -> int:
        slot = self._pool.alloc(length)
        if slot is not None:
            return slot
        if not evict:
            raise TierFullError(f"the {self.name} tier has no room for a {length}-byte chunk")
        plan = self._room_for(length)
        if not plan:  # [] cannot happen (alloc just failed under the lock)
            raise TierFullError(f"the {self.name} tier is full and pinned chunks block every page")
        for victim in plan:
            entry = self._catalog[victim]
            self._drop(victim, entry)
            evicted.append((victim, entry.meta))
            self._count("evictions")
        slot = self._pool.alloc(length)
        if slot is None:  # the plan frees a slot of the class or a whole page: unreachable
            raise TierFullError(f"the {self.name} tier found no room after evicting {len(plan)} chunks")
        return slot

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0 and entry.dead:
                self._pool.free(entry.slot)

    # -- writing: reserve, fill, commit -------------------------------------------------------------
    def reserve(
        self, key: bytes, nbytes: int, meta: ChunkMeta = EMPTY_META, *, evict: bool = True
    ) -> SlotReservation:
        """Take a slot for a ``nbytes`` chunk to be written in place; publish it with ``commit()``.

        Call order: ``reserve`` -> fill ``reservation.data`` (any thread, outside every lock) ->
        ``reservation.commit()`` or ``reservation.abort()``. Until the commit the slot is invisible (not
        seen by get, contains, acquire, keys or ``len``) and pinned (never evicted, its page never re-cut);
        it counts in ``used_bytes``. A commit replaces an older value of ``key`` and emits the stored
        event; an abort, or a reservation left by ``with`` uncommitted, frees the slot. Either ends it.

        Raises (nothing held then): :class:`ChunkTooLargeError` above ``slot_bytes``,
        :class:`TierFullError` when there is no room (``evict=False``) or none can be made, and
        :class:`StoreError` when the tier is closed. Victims evicted to make room are gone even if the
        reservation is aborted later.
        """
        key = check_key(key)
        if nbytes < 0:
            raise InvalidArgumentError(f"cannot reserve {nbytes} bytes")
        if nbytes > self._pool.slot_bytes:
            raise ChunkTooLargeError(
                f"a {nbytes}-byte chunk exceeds the {self.name} tier's slots ({self._pool.slot_bytes} bytes)"
            )
        evicted: list[tuple[bytes, ChunkMeta]] = []
        try:
            with self._lock:
                self._check_open()
                slot = self._reserve(nbytes, evict, evicted)
        finally:
            # Listeners run outside the lock; the victims are gone whatever happens to this reservation.
            if evicted:
                self._emit_removed([k for k, _ in evicted], [m for _, m in evicted])
        return self._reservation(key, slot, nbytes, meta)

    def _reservation(self, key: bytes, slot: int, nbytes: int, meta: ChunkMeta) -> SlotReservation:
        pool = self._pool
        return SlotReservation(
            self, key, slot, nbytes, meta, pool.view(slot, nbytes), pool.host_view(slot, nbytes)
        )

    def reserve_many(self, specs: Sequence[tuple[bytes, int, ChunkMeta]]) -> list[SlotReservation]:
        """Reservations for the leading ``specs`` (key, nbytes, meta) that fit without evicting anything,
        taken under one lock; stops at the first that does not fit or is larger than the slots (the caller
        makes room for it with :meth:`reserve`, which also reports a size it cannot take). Each is then used
        as one from :meth:`reserve`. Raises :class:`InvalidArgumentError` for a bad key (nothing held)."""
        checked = []
        for key, nbytes, meta in specs:
            key = check_key(key)
            if not 0 <= nbytes <= self._pool.slot_bytes:
                break
            checked.append((key, nbytes, meta))
        pool = self._pool
        out: list[SlotReservation] = []
        with self._lock:
            self._check_open()
            for key, nbytes, meta in checked:
                slot = pool.alloc(nbytes)
                if slot is None:
                    break
                out.append(self._reservation(key, slot, nbytes, meta))
        return out

    def _commit(self, res: SlotReservation, if_absent: bool) -> bool:
        """Publish a filled reservation (see :meth:`SlotReservation.commit`); whether it was stored."""
        with self._lock:
            stored = self._publish(res, if_absent)
        if stored and self._listeners:  # skip building the event when nobody listens
            self._emit_stored([res.key], [res.meta])
        return stored

    def commit_many(self, reservations: Sequence[SlotReservation]) -> list[BaseException | None]:
        """Commit several reservations under one lock, with one stored event for them all; per
        reservation, ``None`` or the error its own :meth:`SlotReservation.commit` would have raised."""
        results: list[BaseException | None] = []
        stored: list[SlotReservation] = []
        with self._lock:
            for res in reservations:
                try:
                    self._publish(res, False)
                except (InvalidArgumentError, StoreError) as exc:
                    results.append(exc)
                    continue
                results.append(None)
                stored.append(res)
        if stored and self._listeners:
            self._emit_stored([r.key for r in stored], [r.meta for r in stored])
        return results

    def _publish(self, res: SlotReservation, if_absent: bool) -> bool:
        """Make ``res`` the chunk under its key (call with the lock held); whether it was stored."""
        key = res.key
        if res._state != _RESERVED:
            raise InvalidArgumentError("the reservation was already committed or aborted")
        res._state = _DONE
        if self._closed:
            raise StoreError(f"the {self.name} tier is closed")  # the pool is gone with its slots
        old = self._catalog.get(key)
        if old is not None:
            if if_absent:
                self._pool.free(res.offset)
                return False
            self._drop(key, old)
        # The policy weighs the chunk by its length; victims are charged its slot (the catalog's charge).
        self._catalog.add(key, _Entry(res.offset, res.nbytes, res.meta, res.data, res.mem), res.nbytes)
        stats = self.stats
        stats.puts += 1
        stats.bytes_written += res.nbytes
        return True

    def _abort(self, res: SlotReservation) -> None:
        with self._lock:
            if res._state != _RESERVED:
                return
            res._state = _DONE
            if not self._closed:
                self._pool.free(res.offset)

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
        """Copy ``data`` into a slot (see :meth:`Tier.put`): :meth:`reserve`, copy, commit.

        ``if_absent=True`` (the Store promoting a chunk) keeps a value that another thread stored meanwhile
        instead of replacing it with this, possibly older, one.
        """
        src = as_byte_tensor(data)
        res = self.reserve(key, src.numel(), meta, evict=evict)
        try:
            res.data.copy_(src)
        except Exception as exc:
            res.abort()
            with self._lock:
                self._count("errors")
            raise TierIOError(f"copy into the {self.name} tier failed: {exc}") from exc
        self._commit(res, if_absent)

    def _pin(self, key: bytes, count: bool = True) -> _Entry | None:
        with self._lock:
            self._check_open()
            return self._take(key, self._catalog.get(key), count)

    def _take(self, key: bytes, entry: _Entry | None, count: bool) -> _Entry | None:
        """Pin ``entry`` (the lock held), counting a hit or a miss when ``count``."""
        if entry is None:
            if count:
                self.stats.misses += 1
            return None
        entry.pins += 1
        if count:
            self._catalog.touch(key)
            stats = self.stats
            stats.hits += 1
            stats.bytes_read += entry.length
        return entry

    def _handle(self, key: bytes, entry: _Entry) -> ChunkHandle:
        """The handle of a pinned entry; releasing it unpins."""
        return ChunkHandle(key, entry.view, entry.meta, partial(self._unpin, entry), entry.mem)

    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """Copy the chunk out of its slot (see :meth:`Tier.get`)."""
        key = check_key(key)
        dst: torch.Tensor | None = None
        if out is not None:
            dst = as_byte_tensor(out)
        entry = self._pin(key)
        if entry is None:
            return None
        try:
            if dst is not None and dst.numel() < entry.length:
                raise InvalidArgumentError(f"out holds {dst.numel()} bytes, the chunk {entry.length}")
            src = entry.view
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
        return self._handle(key, entry)

    def acquire_many(self, keys: Sequence[bytes], max_bytes: int) -> list[ChunkHandle | None]:
        """:meth:`acquire` of several keys under one lock (hits and misses counted as there), for a prefix
        of ``keys``: it stops before a hit that would take the pinned bytes over ``max_bytes`` once there is
        at least one (the keys after the returned ones were not looked at)."""
        keys = [check_key(k) for k in keys]
        out: list[ChunkHandle | None] = []
        total = 0
        with self._lock:
            self._check_open()
            for key in keys:
                entry = self._catalog.get(key)
                if entry is not None:
                    if total and total + entry.length > max_bytes:
                        break
                    total += entry.length
                entry = self._take(key, entry, True)
                out.append(None if entry is None else self._handle(key, entry))
        return out

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """The chunk's metadata, or ``None`` if absent (not an access)."""
        return self._catalog.get_meta(key)

    def contains(self, key: bytes) -> bool:
        """Whether the chunk is stored (not an access)."""
        return self._catalog.contains(key)

    def remove(self, key: bytes) -> bool:
        """Drop the chunk (its slot is reused once unpinned)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            entry = self._catalog.get(key)
            if entry is None:
                return False
            self._drop(key, entry)
        self._emit_removed([key], [entry.meta])
        return True

    def victims(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys whose slots add up to at least ``num_bytes`` (fewer if the tier is
        short of unpinned chunks). For room for one chunk of ``n`` bytes, use :meth:`victims_for`."""
        if num_bytes <= 0:
            return []
        with self._lock:
            # coldest(), not the catalog's victims(): this tier's walk stops at the last victim.
            return [key for key, _ in self._catalog.coldest(num_bytes)[0]]

    def victims_for(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys whose removal lets a ``num_bytes`` chunk be placed (see the module
        docstring); ``[]`` when it fits now (:meth:`fits`) or when pinned chunks block every way."""
        if num_bytes > self._pool.slot_bytes:
            return []
        with self._lock:
            return self._room_for(num_bytes) or []

    def fits(self, num_bytes: int) -> bool:
        """Whether a ``num_bytes`` chunk would be placed now without evicting anything."""
        if num_bytes > self._pool.slot_bytes:
            return False
        with self._lock:
            return self._pool.can_alloc(num_bytes)

    def keys(self) -> Iterator[bytes]:
        """A snapshot of the stored keys."""
        return self._catalog.keys()

    def size_of(self, key: bytes) -> int | None:
        """Stored bytes of the chunk, or ``None`` if absent."""
        return self._catalog.size_of(key)

    def slot_span(self, key: bytes) -> tuple[int, int] | None:
        """Byte offset and length of the chunk inside the pool buffer (valid while pinned), or ``None``."""
        key = check_key(key)
        with self._lock:
            entry = self._catalog.get(key)
            return None if entry is None else (entry.slot, entry.length)

    @property
    def slot_bytes(self) -> int:
        """The largest chunk the tier holds (the pool's page size and largest class)."""
        return self._pool.slot_bytes

    @property
    def buffer(self) -> torch.Tensor:
        """The pool buffer (offsets from :meth:`slot_span` are relative to it)."""
        return self._pool.buffer

    def pin(self, key: bytes) -> ChunkHandle | None:
        """Pin the chunk to move it between tiers (no hit counted, recency kept)."""
        return self.acquire(key, count=False)

    def put_if_absent(
        self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META, *, evict: bool
    ) -> None:
        """:meth:`put` unless the key is present, decided under the tier's lock."""
        self.put(key, data, meta, evict=evict, if_absent=True)

    def memory_region(self) -> torch.Tensor:
        """The pool buffer: every chunk of this tier lies in it."""
        return self._pool.buffer

    @property
    def capacity_bytes(self) -> int:
        """Pages times page size (``slot_bytes``)."""
        return self._pool.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the slots held (including removed chunks still pinned by readers), by class size."""
        with self._lock:
            return self._pool.used_bytes

    def __len__(self) -> int:
        return len(self._catalog)

    def close(self) -> None:
        """Drop every chunk and release the pool; later calls raise :class:`StoreError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._catalog.clear()
            self._pool.close()
