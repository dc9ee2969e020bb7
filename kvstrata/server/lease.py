"""The server side of the lease opcodes that the shm and nixl transports share.

The wire messages, the opcodes and their semantics are specified in :mod:`kvstrata.transport.lease`; this
module keeps the leases themselves: pins of chunks being read (``Store.acquire_many``), reservations of
slots being written (``Store.reserve_many``, committed by ``Store.commit_many``), staging slots for chunks
outside the clients' reach, and the expiry that keeps a stalled client from holding memory forever. All
of it lives on the server's event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvstrata.config import StoreConfig
from kvstrata.core.chunk import EMPTY_META, ChunkHandle
from kvstrata.errors import InvalidArgumentError, KVStrataError, ProtocolError
from kvstrata.kvstore.store import Store, StoreReservation
from kvstrata.server.connection import ServerConnection
from kvstrata.transport import protocol as p
from kvstrata.transport.lease import (
    DEFAULT_LEASE_TTL_S,
    GET,
    MAX_LEASES_PER_CONNECTION,
    PUT_BEGIN,
    PUT_COMMIT,
    RELEASE,
    LeaseGetReply,
    LeaseGetRequest,
    PutBeginReply,
    PutBeginRequest,
    PutCommitItem,
    PutCommitRequest,
    ReleaseReply,
    ReleaseRequest,
)

__all__ = ["LeaseServer", "StagingPool", "reservation_bound", "slot_bytes_of"]

log = logging.getLogger(__name__)


class StagingPool:
    """Fixed-size staging slots carved from one byte tensor (a free list; not thread-safe)."""

    def __init__(self, buffer: torch.Tensor, slot_bytes: int) -> None:
        if slot_bytes <= 0:
            raise InvalidArgumentError(f"staging slot size must be positive, got {slot_bytes}")
        self.buffer = buffer
        self.slot_bytes = slot_bytes
        self.num_slots = buffer.numel() // slot_bytes
        self._free = list(range(self.num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        """Slots that :meth:`alloc` can hand out now."""
        return len(self._free)

    def alloc(self) -> int | None:
        """A free slot, or ``None``."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        """Give a slot back."""
        self._free.append(slot)

    def view(self, slot: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of ``slot``."""
        return self.buffer.narrow(0, slot * self.slot_bytes, nbytes)


def reservation_bound(pool_bytes: int, slot_bytes: int, staging_slots: int) -> int:
    """Bytes of put reservations all connections together may hold: half the host pool (a put batch is
    written in place, not staged, while the other half stays for readable chunks), at least the staging
    area's size. In bytes, not slots: a pool sized for 8 MiB chunks takes 32 times as many 256 KiB ones."""
    return max(staging_slots * slot_bytes, pool_bytes // 2)


def slot_bytes_of(config: Any) -> int:
    """The host tier's slot size (the largest chunk) from a full config or a StoreConfig."""

    store = getattr(config, "store", config)
    return int(getattr(store, "slot_bytes", 0) or StoreConfig().slot_bytes)


@dataclass(slots=True)
class _Lease:
    owner: int
    deadline: float
    size: int
    handle: ChunkHandle | None = None
    staging: int | None = None
    #: a Store reservation the client writes into (a put lease), committed by PUT_COMMIT
    reserved: StoreReservation | None = None
    put: bool = False
    expired: bool = False


#: The key a put reservation is made under before PUT_COMMIT names the real one (never visible).
_PENDING_KEY = bytes(16)


class LeaseServer:
    """The server side of the lease opcodes, for one transport extension.

    ``locate(tensor)`` returns the wire position of a pinned chunk's bytes when they lie in memory the
    clients can reach (the shm segment; NIXL-registered memory), else ``None``; ``staging_position(slot)``
    is the wire position of a staging slot. Handlers run on the server's event loop.
    """

    def __init__(
        self,
        base: int,
        staging: StagingPool,
        locate: Callable[[torch.Tensor], int | None],
        staging_position: Callable[[int], int],
        *,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        max_reserved_bytes: int | None = None,
    ) -> None:
        self.base = base
        self.staging = staging
        self._locate = locate
        self._staging_position = staging_position
        self.lease_ttl_s = lease_ttl_s
        #: bound on the bytes of put reservations held by all connections together (default: the staging
        #: area's size)
        default = staging.num_slots * staging.slot_bytes
        self.max_reserved_bytes = default if max_reserved_bytes is None else max(0, max_reserved_bytes)
        self._leases: OrderedDict[int, _Lease] = OrderedDict()
        self._per_owner: dict[int, set[int]] = {}
        self._quarantine: dict[int, list[int]] = {}
        self._quarantined_reservations: dict[int, list[StoreReservation]] = {}
        #: put leases holding a Store reservation, all connections together, and their bytes
        self.reserved_puts = 0
        self.reserved_bytes = 0
        self._next_id = 1
        self._reaper: asyncio.TimerHandle | None = None
        self.counters = {"leases": 0, "expired": 0, "staged_gets": 0, "deferred": 0}

    # -- bookkeeping -------------------------------------------------------------------------------
    def _new_lease(self, owner: int, lease: _Lease) -> int:
        lease_id = self._next_id
        self._next_id += 1
        self._leases[lease_id] = lease
        owned = self._per_owner.get(owner)
        if owned is None:
            owned = self._per_owner[owner] = set()
        owned.add(lease_id)
        return lease_id

    def _end(self, lease_id: int, lease: _Lease, *, expired: bool) -> None:
        del self._leases[lease_id]
        owned = self._per_owner.get(lease.owner)
        if owned is not None:
            owned.discard(lease_id)
        if lease.handle is not None:
            lease.handle.release()
            lease.handle = None
        if lease.reserved is not None:
            self._unreserved(lease.reserved)
            if expired and lease.put:
                # The client may still be writing into it: hold it (invisible) until the connection ends.
                self._quarantined_reservations.setdefault(lease.owner, []).append(lease.reserved)
            else:
                lease.reserved.abort()  # a no-op once committed
            lease.reserved = None
        if lease.staging is not None:
            if expired and lease.put:
                # The client may still be writing into it: keep it out of use until the connection ends.
                self._quarantine.setdefault(lease.owner, []).append(lease.staging)
            else:
                self.staging.free(lease.staging)
            lease.staging = None

    def _unreserved(self, reservation: StoreReservation) -> None:
        """Count a put reservation as no longer held (committed, aborted or quarantined)."""
        self.reserved_puts -= 1
        self.reserved_bytes -= reservation.nbytes

    def reap(self, now: float | None = None) -> int:
        """End leases past their deadline (oldest first; they were created in deadline order)."""
        now = time.monotonic() if now is None else now
        count = 0
        while self._leases:
            lease_id, lease = next(iter(self._leases.items()))
            if lease.deadline > now:
                break
            lease.expired = True
            self._end(lease_id, lease, expired=True)
            count += 1
        if count:
            self.counters["expired"] += count
            log.warning("%d leases expired (a client stalled for over %.0f s)", count, self.lease_ttl_s)
        return count

    def _schedule_reaper(self) -> None:
        """While leases exist, reap on the event loop every quarter TTL (so a stalled client's pins end
        even when no other lease request arrives)."""
        if self._reaper is not None or not self._leases:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the server's loop (tests): reaping stays lazy
        self._reaper = loop.call_later(max(self.lease_ttl_s / 4, 0.01), self._reap_tick)

    def _reap_tick(self) -> None:
        self._reaper = None
        self.reap()
        self._schedule_reaper()

    def held_by(self, owner: int) -> int:
        """Leases ``owner`` holds now."""
        return len(self._per_owner.get(owner, ()))

    @property
    def active(self) -> int:
        """Leases held by every client together."""
        return len(self._leases)

    def owner_closed(self, owner: int) -> None:
        """A connection ended: end its leases and free its quarantined staging slots."""
        for lease_id in list(self._per_owner.pop(owner, ())):
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.put = False  # the writer is gone: the slot can be reused
                self._end(lease_id, lease, expired=False)
        for slot in self._quarantine.pop(owner, []):
            self.staging.free(slot)
        for res in self._quarantined_reservations.pop(owner, []):
            res.abort()

    def close(self) -> None:
        """End every lease (at shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for owner in list(self._per_owner):
            self.owner_closed(owner)

    # -- operations (also used directly by tests) --------------------------------------------------
    def lease_get(self, owner: int, store: Store, keys: Sequence[bytes]) -> LeaseGetReply:
        """Pin each key and say where its bytes are."""
        self.reap()
        count = len(keys)
        sizes = [-1] * count
        positions = [-1] * count
        leases = [0] * count
        deadline = time.monotonic() + self.lease_ttl_s
        room = MAX_LEASES_PER_CONNECTION - self.held_by(owner)
        acquire, locate, new_lease = store.acquire, self._locate, self._new_lease
        granted = deferred = 0
        # Every key pinned at once (one lock for the top tier's hits) when all may be granted.
        pinned: list[ChunkHandle | None] | None = store.acquire_many(keys) if room >= count else None
        try:
            for i, key in enumerate(keys):
                if granted >= room:
                    sizes[i] = -2
                    deferred += 1
                    continue
                handle: ChunkHandle | None
                if pinned is not None:
                    handle, pinned[i] = pinned[i], None
                else:
                    handle = acquire(key)
                if handle is None:
                    continue
                data = handle.data
                if data.dtype != torch.uint8 or data.dim() != 1:
                    data = data.reshape(-1).view(torch.uint8)
                size = data.numel()
                position = locate(data) if data.is_cpu else None
                if position is not None:
                    lease = _Lease(owner, deadline, size, handle=handle)
                else:
                    slot = self.staging.alloc() if size <= self.staging.slot_bytes else None
                    if slot is None:
                        handle.release()
                        sizes[i] = -2
                        deferred += 1
                        continue
                    try:
                        self.staging.view(slot, size).copy_(data)
                    finally:
                        handle.release()
                    lease = _Lease(owner, deadline, size, staging=slot)
                    position = self._staging_position(slot)
                    self.counters["staged_gets"] += 1
                granted += 1
                sizes[i] = size
                positions[i] = position
                leases[i] = new_lease(owner, lease)
        except BaseException:
            for left in pinned or ():
                if left is not None:
                    left.release()
            raise
        self.counters["leases"] += granted
        if deferred:
            self.counters["deferred"] += deferred
        ttl_ms = int(self.lease_ttl_s * 1000)
        return LeaseGetReply(sizes=sizes, positions=positions, leases=leases, ttl_ms=ttl_ms).sealed()

    def release(self, owner: int, lease_ids: Sequence[int]) -> ReleaseReply:
        """End leases; ``valid[i]`` is whether lease ``i`` was still held (not expired, this owner's)."""
        self.reap()
        valid: list[bool] = []
        get, end = self._leases.get, self._end
        for lease_id in lease_ids:
            lease = get(lease_id)
            if lease is None or lease.owner != owner or lease.put:
                valid.append(False)
                continue
            end(lease_id, lease, expired=False)
            valid.append(True)
        return ReleaseReply(valid=valid).sealed()

    def _reserve_many(self, store: Store | None, sizes: Sequence[int]) -> list[tuple[StoreReservation, int]]:
        """Store reservations in the shared region, with their positions, for the leading ``sizes``
        (stopping at the first that gets none: no reserve call, no room, not in the shared region)."""
        if store is None or not sizes:
            return []
        try:
            # The key and metadata come with PUT_COMMIT; until then the slots are invisible anyway.
            got = store.reserve_many([(_PENDING_KEY, size, EMPTY_META) for size in sizes])
        except KVStrataError:
            return []
        out: list[tuple[StoreReservation, int]] = []
        for k, res in enumerate(got):
            data = res.data
            position = self._locate(data) if data.is_cpu else None
            if position is None:
                for other in got[k:]:
                    other.abort()
                break
            out.append((res, position))
        return out

    def put_begin(self, owner: int, sizes: Sequence[int], store: Store | None = None) -> PutBeginReply:
        """Lease a slot for each chunk that fits: a reservation in ``store``'s top tier when it lies in
        the shared region (the client writes the chunk in place), else a staging slot while any is free."""
        self.reap()
        count = len(sizes)
        leases = [0] * count
        positions = [-1] * count
        deadline = time.monotonic() + self.lease_ttl_s
        room = MAX_LEASES_PER_CONNECTION - self.held_by(owner)
        new_lease = self._new_lease
        granted = 0
        i = 0
        while i < count and granted < room:
            # Reservations for as many as possible at once (one Store call), then the next one, which
            # got none, gets a staging slot if any is free, and reserving resumes after it.
            want, budget = 0, self.max_reserved_bytes - self.reserved_bytes
            while i + want < count and granted + want < room and sizes[i + want] <= budget:
                budget -= sizes[i + want]
                want += 1
            got = self._reserve_many(store, sizes[i : i + want]) if want > 0 else []
            for res, position in got:
                self.reserved_puts += 1
                self.reserved_bytes += res.nbytes
                leases[i] = new_lease(owner, _Lease(owner, deadline, sizes[i], reserved=res, put=True))
                positions[i] = position
                i += 1
            granted += len(got)
            if i < count and granted < room:
                size = sizes[i]
                slot = self.staging.alloc() if size <= self.staging.slot_bytes else None
                if slot is not None:
                    leases[i] = new_lease(owner, _Lease(owner, deadline, size, staging=slot, put=True))
                    positions[i] = self._staging_position(slot)
                    granted += 1
                i += 1
        self.counters["leases"] += granted
        return PutBeginReply(leases=leases, positions=positions).sealed()

    def put_commit(self, owner: int, store: Store, items: Sequence[PutCommitItem]) -> p.PutManyReply:
        """Store each staged chunk and free its slot; per item "" or an error code."""
        self.reap()
        results: list[str] = []
        get = self._leases.get
        # Chunks written in full into their reserved slots are committed together (one lock, one event).
        batched: list[tuple[int, int, _Lease, StoreReservation]] = []  # (index in results, lease id, ...)
        try:
            for item in items:
                lease_id = item.lease
                lease = get(lease_id)
                if lease is None or lease.owner != owner or not lease.put:
                    results.append("busy")  # expired or unknown: nothing stored, the client may retry
                    continue
                reserved = lease.reserved
                if reserved is not None and item.size == reserved.nbytes:
                    try:
                        reserved.rename(item.key, p.chunk_meta(item.meta))
                    except KVStrataError as exc:
                        lease.put = False
                        self._end(lease_id, lease, expired=False)
                        results.append(p.error_code(exc))
                        continue
                    batched.append((len(results), lease_id, lease, reserved))
                    results.append("")
                    continue
                results.append(self._commit_one(store, item, lease_id, lease))
        finally:
            if batched:
                self._commit_batch(store, batched, results)
        return p.PutManyReply(results=results)

    def _commit_batch(
        self, store: Store, batched: list[tuple[int, int, _Lease, StoreReservation]], results: list[str]
    ) -> None:
        """Commit the reservations of ``batched`` together, then end their leases."""
        try:
            errors = store.commit_many([reserved for _, _, _, reserved in batched])
        except KVStrataError as exc:
            errors = [exc] * len(batched)
        for (index, lease_id, lease, reserved), error in zip(batched, errors, strict=True):
            if error is None:
                self._unreserved(reserved)
                lease.reserved = None  # committed: nothing left to abort
            else:
                results[index] = p.error_code(error)
            lease.put = False
            self._end(lease_id, lease, expired=False)  # aborts a reservation not committed

    def _commit_one(self, store: Store, item: PutCommitItem, lease_id: int, lease: _Lease) -> str:
        """Store one staged chunk (or one written shorter than reserved; a full one is committed in
        place by :meth:`_commit_batch`) and end its lease."""
        code = ""
        try:
            reserved = lease.reserved
            if item.size > lease.size:
                code = "invalid_argument"
            elif reserved is not None:  # written shorter than reserved: store the bytes written
                store.put(item.key, reserved.data[: item.size], p.chunk_meta(item.meta))
            else:
                assert lease.staging is not None
                store.put(item.key, self.staging.view(lease.staging, item.size), p.chunk_meta(item.meta))
        except KVStrataError as exc:
            code = p.error_code(exc)
        finally:
            lease.put = False
            self._end(lease_id, lease, expired=False)  # aborts a reservation not committed
        return code

    # -- server handlers ---------------------------------------------------------------------------
    def handlers(self) -> Mapping[int, Callable[[ServerConnection, p.Header, Any], Awaitable[None]]]:
        """Opcode -> handler coroutine for the four lease operations."""
        base = self.base

        async def on_get(conn: ServerConnection, header: p.Header, meta: LeaseGetRequest) -> None:
            _no_payload(header)
            reply = self.lease_get(id(conn), conn.store, meta.keys)
            self._schedule_reaper()
            await conn.reply(base + GET, header.request_id, reply)

        async def on_release(conn: ServerConnection, header: p.Header, meta: ReleaseRequest) -> None:
            _no_payload(header)
            await conn.reply(base + RELEASE, header.request_id, self.release(id(conn), meta.leases))

        async def on_put_begin(conn: ServerConnection, header: p.Header, meta: PutBeginRequest) -> None:
            _no_payload(header)
            reply = self.put_begin(id(conn), meta.sizes, conn.store)
            self._schedule_reaper()
            await conn.reply(base + PUT_BEGIN, header.request_id, reply)

        async def on_put_commit(conn: ServerConnection, header: p.Header, meta: PutCommitRequest) -> None:
            _no_payload(header)
            reply = self.put_commit(id(conn), conn.store, meta.items)
            await conn.reply(base + PUT_COMMIT, header.request_id, reply)

        return {
            base + GET: on_get,
            base + RELEASE: on_release,
            base + PUT_BEGIN: on_put_begin,
            base + PUT_COMMIT: on_put_commit,
        }


def _no_payload(header: p.Header) -> None:
    if header.payload_len:
        raise ProtocolError("lease requests carry no payload")
