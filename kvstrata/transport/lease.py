"""Leased slots: the part the out-of-band transports (shm, nixl) share.

Those transports move chunk bytes outside the control connection — the client copies straight out of (or
into) the server's memory — so the control connection carries only *where* the bytes are and *leases* that
keep them there. Five extension opcodes at ``base + 0..4`` (shm: 0x40, nixl: 0x50):

- ``ATTACH`` (``base+0``): transport specific (the shm segment's name, NIXL agent metadata). Only after a
  successful HELLO, so only authenticated clients learn where the server's memory is.
- ``LEASE_GET`` ``{keys}`` -> ``{sizes, positions, leases}``: each hit is pinned (``Store.acquire``) and
  its position in the shared region is returned with a lease id; a hit that is not in the shared region
  (disk or device tier) is first copied into a staging slot. ``sizes[i]`` is ``-1`` for a miss and ``-2``
  when no lease could be granted now (the client fetches it over the control connection instead).
- ``RELEASE`` ``{leases}`` -> ``{valid}``: unpins; ``valid[i]`` is false when the lease had expired, in
  which case the bytes the client copied may have been overwritten and the client reports a miss.
- ``PUT_BEGIN`` ``{sizes}`` -> ``{leases, positions}``: slots to write into (lease 0: none free). Each is
  a slot reserved in the Store's top tier (``Store.reserve``) when that tier lies in the shared region,
  so the client writes the chunk where it will stay; else (or beyond the bound on reserved slots) a
  staging slot.
- ``PUT_COMMIT`` ``{items: [{lease, key, size, meta}]}`` -> ``{results}``: the server commits each
  reserved slot under its key (no copy), or stores a staged chunk (one copy, staging slot -> Store) and
  frees the staging slot; ``results`` as in PUT_MANY.

Leases are per connection and bounded (``MAX_LEASES_PER_CONNECTION``); they expire after ``lease_ttl_s``
(a client that stalls must not pin memory forever) and all of a connection's leases end when it closes.
An expired *get* lease unpins the chunk (its slot may be reused; the client's RELEASE learns that and
reports a miss). An expired *put* lease's slot (reserved or staging) is quarantined until its connection
closes, because the client may still be writing into it; then a reserved slot is aborted (never visible).
Put reservations held by all connections together are bounded in bytes (:func:`reservation_bound`: half
the host pool, at least the staging area's size), so that uncommitted puts never take the whole pool. All
lease state lives on the server's event-loop thread.

Clients pipeline each batch: all LEASE_GETs (or PUT_BEGINs) of a batch's groups go out at once, the client
copies group k while the server works on group k+1, and a group's PUT_COMMIT goes out as soon as it is
written; RELEASE goes out without waiting for its answer (see ``ttl_ms``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec
import torch

from kvstrata.core.buffers import flat_bytes
from kvstrata.core.chunk import EMPTY_META, ChunkHandle
from kvstrata.errors import InvalidArgumentError, KVStrataError, ProtocolError
from kvstrata.transport import protocol as p
from kvstrata.transport.base import PutSpec, ServerAddress, TransportOptions
from kvstrata.transport.tcp import TcpTransport

__all__ = [
    "ATTACH",
    "GET",
    "MAX_LEASES_PER_CONNECTION",
    "PUT_BEGIN",
    "PUT_COMMIT",
    "RELEASE",
    "LeaseGetReply",
    "LeaseServer",
    "LeaseTransport",
    "PutBeginReply",
    "PutBeginRequest",
    "PutCommitItem",
    "PutCommitRequest",
    "ReleaseReply",
    "ReleaseRequest",
    "StagingPool",
    "register_lease_ops",
    "reservation_bound",
    "slot_bytes_of",
]

log = logging.getLogger(__name__)

#: Offsets of the lease opcodes from a transport's base opcode.
ATTACH, GET, RELEASE, PUT_BEGIN, PUT_COMMIT = range(5)
#: Leases one connection may hold at once (requests beyond it are deferred, never queued).
MAX_LEASES_PER_CONNECTION = p.MAX_KEYS
#: Chunks per LEASE_GET / PUT_BEGIN / PUT_COMMIT of a pipelined batch: the server works on one group
#: while the client copies another. A quarter of a large batch; a batch of up to 64 chunks is one group,
#: because on a small machine every extra message costs a wake-up of each side (measured: 64 chunks of
#: 256 KiB in groups of 16 or 8 moved 10-25% slower than in one group).
_MIN_GROUP, _MAX_GROUP = 64, 256


def _groups(batch: list[int]) -> list[list[int]]:
    """``batch`` cut into pipeline groups."""
    size = min(_MAX_GROUP, max(_MIN_GROUP, len(batch) // 4))
    return [batch[i : i + size] for i in range(0, len(batch), size)]


#: Default lease lifetime; a client copies a chunk in milliseconds, so this only catches stalled clients.
DEFAULT_LEASE_TTL_S = 30.0

Position = Annotated[int, msgspec.Meta(ge=-1, le=(1 << 63) - 1)]
LeaseId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Keys = Annotated[list[p.Key], msgspec.Meta(max_length=p.MAX_KEYS)]


class _Meta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of the lease metadata structs (msgpack maps, unknown fields ignored)."""


class LeaseGetRequest(_Meta):
    """LEASE_GET: the keys to pin."""

    keys: Keys


class LeaseGetReply(_Meta):
    """Per key: size (-1 miss, -2 deferred), position in the shared region, lease id (0 when none)."""

    sizes: Annotated[list[p.SignedSize], msgspec.Meta(max_length=p.MAX_KEYS)]
    positions: Annotated[list[Position], msgspec.Meta(max_length=p.MAX_KEYS)]
    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=p.MAX_KEYS)]
    #: the leases' lifetime in milliseconds (0: not said); lets a client skip waiting for RELEASE's answer
    ttl_ms: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0


class ReleaseRequest(_Meta):
    """RELEASE: lease ids to end."""

    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=p.MAX_KEYS)]


class ReleaseReply(_Meta):
    """Per lease: true when it was still valid (the bytes read under it are good)."""

    valid: Annotated[list[bool], msgspec.Meta(max_length=p.MAX_KEYS)]


class PutBeginRequest(_Meta):
    """PUT_BEGIN: the sizes of the chunks about to be written."""

    sizes: Annotated[list[p.Size], msgspec.Meta(max_length=p.MAX_KEYS)]


class PutBeginReply(_Meta):
    """Per chunk: a staging lease and its position (lease 0, position -1: none free now)."""

    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=p.MAX_KEYS)]
    positions: Annotated[list[Position], msgspec.Meta(max_length=p.MAX_KEYS)]


class PutCommitItem(_Meta):
    """One staged chunk to store."""

    lease: LeaseId
    key: p.Key
    size: p.Size
    meta: p.WireMeta = msgspec.field(default_factory=p.WireMeta)


class PutCommitRequest(_Meta):
    """PUT_COMMIT: staged chunks to store."""

    items: Annotated[list[PutCommitItem], msgspec.Meta(max_length=p.MAX_KEYS)]


def register_lease_ops(base: int) -> None:
    """Register the metadata structs of the lease opcodes ``base+1..base+4`` (ATTACH is the caller's)."""
    p.register_meta(base + GET, LeaseGetRequest, LeaseGetReply)
    p.register_meta(base + RELEASE, ReleaseRequest, ReleaseReply)
    p.register_meta(base + PUT_BEGIN, PutBeginRequest, PutBeginReply)
    p.register_meta(base + PUT_COMMIT, PutCommitRequest, p.PutManyReply)


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
    from kvstrata.config import StoreConfig

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
    reserved: Any = None
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
        self._quarantined_reservations: dict[int, list[Any]] = {}
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

    def _unreserved(self, reservation: Any) -> None:
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
    def lease_get(self, owner: int, store: Any, keys: Sequence[bytes]) -> LeaseGetReply:
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
        many = getattr(store, "acquire_many", None)
        pinned: list[ChunkHandle | None] | None = list(many(keys)) if many and room >= count else None
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
        return LeaseGetReply(sizes=sizes, positions=positions, leases=leases, ttl_ms=ttl_ms)

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
        return ReleaseReply(valid=valid)

    def _reserve_many(self, store: Any, sizes: Sequence[int]) -> list[tuple[Any, int]]:
        """Store reservations in the shared region, with their positions, for the leading ``sizes``
        (stopping at the first that gets none: no reserve call, no room, not in the shared region)."""
        if store is None or not sizes:
            return []
        try:
            many = getattr(store, "reserve_many", None)
            if many is not None:
                # The key and metadata come with PUT_COMMIT; until then the slots are invisible anyway.
                got = list(many([(_PENDING_KEY, size, EMPTY_META) for size in sizes]))
            else:
                reserve = getattr(store, "reserve", None)
                res = None if reserve is None else reserve(_PENDING_KEY, sizes[0])
                got = [] if res is None else [res]
        except KVStrataError:
            return []
        out: list[tuple[Any, int]] = []
        for k, res in enumerate(got):
            data = res.data
            position = self._locate(data) if data.is_cpu else None
            if position is None:
                for other in got[k:]:
                    other.abort()
                break
            out.append((res, position))
        return out

    def put_begin(self, owner: int, sizes: Sequence[int], store: Any = None) -> PutBeginReply:
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
        return PutBeginReply(leases=leases, positions=positions)

    def put_commit(self, owner: int, store: Any, items: Sequence[PutCommitItem]) -> p.PutManyReply:
        """Store each staged chunk and free its slot; per item "" or an error code."""
        from kvstrata.server.app import error_code

        self.reap()
        results: list[str] = []
        get = self._leases.get
        # Chunks written in full into their reserved slots are committed together (one lock, one event).
        batched: list[tuple[int, int, _Lease]] = []  # (index in results, lease id, lease)
        many = getattr(store, "commit_many", None)
        try:
            for item in items:
                lease_id = item.lease
                lease = get(lease_id)
                if lease is None or lease.owner != owner or not lease.put:
                    results.append("busy")  # expired or unknown: nothing stored, the client may retry
                    continue
                reserved = lease.reserved
                if (
                    many is not None
                    and reserved is not None
                    and item.size == reserved.nbytes
                    and hasattr(reserved, "rename")
                ):
                    try:
                        reserved.rename(item.key, p.chunk_meta(item.meta))
                    except KVStrataError as exc:
                        lease.put = False
                        self._end(lease_id, lease, expired=False)
                        results.append(error_code(exc))
                        continue
                    batched.append((len(results), lease_id, lease))
                    results.append("")
                    continue
                results.append(self._commit_one(store, item, lease_id, lease))
        finally:
            if batched:
                self._commit_batch(store, batched, results)
        return p.PutManyReply(results=results)

    def _commit_batch(self, store: Any, batched: list[tuple[int, int, _Lease]], results: list[str]) -> None:
        """Commit the reservations of ``batched`` together, then end their leases."""
        from kvstrata.server.app import error_code

        try:
            errors = store.commit_many([lease.reserved for _, _, lease in batched])
        except KVStrataError as exc:
            errors = [exc] * len(batched)
        for (index, lease_id, lease), error in zip(batched, errors, strict=True):
            if error is None:
                self._unreserved(lease.reserved)
                lease.reserved = None  # committed: nothing left to abort
            else:
                results[index] = error_code(error)
            lease.put = False
            self._end(lease_id, lease, expired=False)  # aborts a reservation not committed

    def _commit_one(self, store: Any, item: PutCommitItem, lease_id: int, lease: _Lease) -> str:
        """Store one staged chunk (or one written shorter than reserved) and end its lease."""
        from kvstrata.server.app import error_code

        code = ""
        try:
            reserved = lease.reserved
            if item.size > lease.size:
                code = "invalid_argument"
            elif reserved is not None and item.size == reserved.nbytes:
                reserved.commit(item.key, p.chunk_meta(item.meta))  # in place: no copy
                self._unreserved(reserved)
                lease.reserved = None  # committed: nothing left to abort
            elif reserved is not None:  # written shorter than reserved: store the bytes written
                store.put(item.key, reserved.data[: item.size], p.chunk_meta(item.meta))
            else:
                assert lease.staging is not None
                store.put(item.key, self.staging.view(lease.staging, item.size), p.chunk_meta(item.meta))
        except KVStrataError as exc:
            code = error_code(exc)
        finally:
            lease.put = False
            self._end(lease_id, lease, expired=False)  # aborts a reservation not committed
        return code

    # -- server handlers ---------------------------------------------------------------------------
    def handlers(self) -> Mapping[int, Callable[[Any, p.Header, Any], Any]]:
        """Opcode -> handler coroutine for the four lease operations."""
        base = self.base

        async def on_get(conn: Any, header: p.Header, meta: LeaseGetRequest) -> None:
            _no_payload(header)
            reply = self.lease_get(id(conn), conn.store, meta.keys)
            self._schedule_reaper()
            await conn.reply(base + GET, header.request_id, reply)

        async def on_release(conn: Any, header: p.Header, meta: ReleaseRequest) -> None:
            _no_payload(header)
            await conn.reply(base + RELEASE, header.request_id, self.release(id(conn), meta.leases))

        async def on_put_begin(conn: Any, header: p.Header, meta: PutBeginRequest) -> None:
            _no_payload(header)
            reply = self.put_begin(id(conn), meta.sizes, conn.store)
            self._schedule_reaper()
            await conn.reply(base + PUT_BEGIN, header.request_id, reply)

        async def on_put_commit(conn: Any, header: p.Header, meta: PutCommitRequest) -> None:
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


class LeaseTransport(TcpTransport):
    """Client side of a leased-slot transport: control over the kvs connection, bytes out of band.

    Subclasses set :attr:`base` and implement :meth:`_attach` (run once after HELLO), :meth:`_read_many`
    and :meth:`_write_many` (move bytes between local tensors and server positions). Chunks the server
    cannot lease (no free staging slot) go over the control connection like ``kvs://``; everything else of
    the :class:`~kvstrata.transport.base.Transport` contract is inherited from the tcp transport.
    """

    base: ClassVar[int] = 0

    def __init__(self, address: ServerAddress, options: TransportOptions) -> None:
        super().__init__(address, options)
        #: request ids of RELEASEs whose replies have not been read yet
        self._pending_releases: list[int] = []

    def connect(self, timeout: float) -> None:
        """Connect, run HELLO (sending this transport's name), then attach to the server's memory."""
        if self._sock is not None:
            return
        super().connect(timeout)
        self._call(timeout, self._attach)

    @abstractmethod
    def _attach(self) -> None:
        """Run the ATTACH exchange and map or register the server's memory."""

    @abstractmethod
    def _read_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Copy the bytes at each server position into its destination tensor."""

    @abstractmethod
    def _write_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Copy each source tensor to its server position."""

    # -- gets --------------------------------------------------------------------------------------
    def get_many(
        self, keys: Sequence[bytes], outs: Sequence[torch.Tensor | None], timeout: float
    ) -> list[torch.Tensor | None]:
        """Lease, copy out of band, release; chunks the server could not lease come over tcp."""
        results: list[torch.Tensor | None] = [None] * len(keys)
        deferred: list[int] = []
        for start in range(0, len(keys), p.MAX_KEYS):
            batch = list(range(start, min(len(keys), start + p.MAX_KEYS)))
            self._call(timeout, self._get_leased, keys, outs, batch, results, deferred)
        if deferred:
            fetched = super().get_many([keys[i] for i in deferred], [outs[i] for i in deferred], timeout)
            for i, got in zip(deferred, fetched, strict=True):
                results[i] = got
        return results

    def _get_leased(
        self,
        keys: Sequence[bytes],
        outs: Sequence[torch.Tensor | None],
        batch: list[int],
        results: list[torch.Tensor | None],
        deferred: list[int],
    ) -> None:
        op = self.base + GET
        groups = _groups(batch)
        sent_at = time.monotonic()
        # Pipelined: every group's LEASE_GET goes out first, so that the server pins group k+1 while
        # this side copies group k (replies come back in request order).
        rids = [self._request(op, LeaseGetRequest(keys=[keys[i] for i in group])) for group in groups]
        taken: list[tuple[int, torch.Tensor, int]] = []
        leases: list[int] = []
        ttl_ms = 1 << 40
        too_small: InvalidArgumentError | None = None
        try:
            for group, rid in zip(groups, rids, strict=True):
                _, reply = self._reply(rid, op)
                n = len(group)
                if len(reply.sizes) != n or len(reply.positions) != n or len(reply.leases) != n:
                    raise ProtocolError(f"{self.address}: LEASE_GET reply does not match the request")
                ttl_ms = min(ttl_ms, reply.ttl_ms)
                spans: list[tuple[int, torch.Tensor]] = []
                for i, size, position, lease in zip(
                    group, reply.sizes, reply.positions, reply.leases, strict=True
                ):
                    if size == -2:
                        deferred.append(i)
                        continue
                    if size < 0:
                        continue
                    if lease <= 0 or position < 0:
                        raise ProtocolError(f"{self.address}: LEASE_GET hit without a lease")
                    leases.append(lease)
                    out = outs[i]
                    if out is None:
                        dest = torch.empty(size, dtype=torch.uint8)
                    else:
                        dest = flat_bytes(out)
                        have = dest.numel()
                        if have < size:
                            too_small = InvalidArgumentError(f"out holds {have} bytes, the chunk has {size}")
                            continue
                        if have > size:
                            dest = dest[:size]
                    spans.append((position, dest))
                    taken.append((i, dest, lease))
                if spans:
                    self._read_many(spans)
        except BaseException:
            # replies may still be in flight: this connection is out of step; the server ends its leases
            self.close()
            raise
        # The server granted the leases after this side sent the requests, so they cannot have expired
        # before sent_at + ttl. Copies done well within that need no answer from RELEASE: it is sent now
        # and its reply read before the next one. Otherwise only leases RELEASE reports valid are hits.
        if not leases:
            good: set[int] = set()
        elif ttl_ms and (time.monotonic() - sent_at) * 2000 < ttl_ms:
            self._pending_releases.append(self._request(self.base + RELEASE, ReleaseRequest(leases=leases)))
            good = set(leases)
        else:
            valid = self._release(leases)
            good = {lease for lease, ok in zip(leases, valid, strict=True) if ok}
        for i, dest, lease in taken:
            if lease in good:
                results[i] = dest
        if too_small is not None:
            raise too_small

    def _reply(self, rid: int, opcode: int) -> tuple[p.Header, Any]:
        """Read the replies of RELEASEs sent without waiting (they come first), then ``rid``'s."""
        while self._pending_releases:
            pending = self._pending_releases.pop(0)
            super()._reply(pending, self.base + RELEASE)
        return super()._reply(rid, opcode)

    def close(self) -> None:
        """Close the connection (the server ends every lease it still holds for it)."""
        self._pending_releases.clear()
        super().close()

    def _release(self, leases: list[int]) -> list[bool]:
        op = self.base + RELEASE
        rid = self._request(op, ReleaseRequest(leases=leases))
        _, reply = self._reply(rid, op)
        if len(reply.valid) != len(leases):
            raise ProtocolError(f"{self.address}: RELEASE reply does not match the request")
        return list(reply.valid)

    # -- puts --------------------------------------------------------------------------------------
    def put_many(self, items: Sequence[PutSpec], timeout: float) -> list[KVStrataError | None]:
        """Lease staging slots, copy into them out of band, commit; what gets no slot goes over tcp."""
        results: list[KVStrataError | None] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            batch = pending[: p.MAX_KEYS]
            left = self._call(timeout, self._put_leased, items, batch, results)
            if len(left) == len(batch):
                break  # no staging slot free at all: the rest goes over the control connection
            pending = left + pending[len(batch) :]
        if pending:
            sent = super().put_many([items[i] for i in pending], timeout)
            for i, err in zip(pending, sent, strict=True):
                results[i] = err
        return results

    def _put_leased(
        self, items: Sequence[PutSpec], batch: list[int], results: list[KVStrataError | None]
    ) -> list[int]:
        begin, commit = self.base + PUT_BEGIN, self.base + PUT_COMMIT
        flats = {i: flat_bytes(items[i].data) for i in batch}
        groups = _groups(batch)
        # Pipelined: every group's PUT_BEGIN goes out first, so that the server reserves group k+1 while
        # this side writes group k, and each group's PUT_COMMIT goes out as soon as it is written, so that
        # the server commits it while this side writes the next (replies come back in request order).
        begins = [
            self._request(begin, PutBeginRequest(sizes=[flats[i].numel() for i in group])) for group in groups
        ]
        left: list[int] = []
        commits: list[tuple[int, list[int]]] = []
        try:
            for group, rid in zip(groups, begins, strict=True):
                _, reply = self._reply(rid, begin)
                if len(reply.leases) != len(group) or len(reply.positions) != len(group):
                    raise ProtocolError(f"{self.address}: PUT_BEGIN reply does not match the request")
                granted: list[int] = []
                spans: list[tuple[int, torch.Tensor]] = []
                written: list[PutCommitItem] = []
                for i, lease, position in zip(group, reply.leases, reply.positions, strict=True):
                    if lease <= 0 or position < 0:
                        left.append(i)
                        continue
                    item, data = items[i], flats[i]
                    granted.append(i)
                    spans.append((position, data))
                    written.append(
                        PutCommitItem(
                            lease=lease, key=item.key, size=data.numel(), meta=p.wire_meta(item.meta)
                        )
                    )
                if written:
                    self._write_many(spans)
                    commits.append((self._request(commit, PutCommitRequest(items=written)), granted))
            for rid, granted in commits:
                _, done = self._reply(rid, commit)
                if len(done.results) != len(granted):
                    raise ProtocolError(f"{self.address}: PUT_COMMIT reply does not match the request")
                for i, code in zip(granted, done.results, strict=True):
                    results[i] = (
                        p.error_for(p.ErrorReply(code=code, message=f"put of item {i}")) if code else None
                    )
        except BaseException:
            # replies may still be in flight: this connection is out of step; the server ends its leases
            self.close()
            raise
        return left
