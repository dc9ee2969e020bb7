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

import logging
import struct
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Self

import msgspec
import torch

from kvstrata.core.buffers import flat_bytes
from kvstrata.errors import InvalidArgumentError, KVStrataError, ProtocolError
from kvstrata.transport import protocol as p
from kvstrata.transport.base import PutSpec, ServerAddress, TransportOptions
from kvstrata.transport.tcp import TcpTransport

__all__ = [
    "ATTACH",
    "DEFAULT_LEASE_TTL_S",
    "GET",
    "MAX_LEASES_PER_CONNECTION",
    "PUT_BEGIN",
    "PUT_COMMIT",
    "RELEASE",
    "LeaseGetReply",
    "LeaseTransport",
    "PutBeginReply",
    "PutBeginRequest",
    "PutCommitItem",
    "PutCommitRequest",
    "ReleaseReply",
    "ReleaseRequest",
    "register_lease_ops",
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


class _Sealed(_Meta, kw_only=True):
    """A reply whose numbers say where to read or write the server's memory. No checksum covers a
    frame's metadata, so a byte flipped on the way would otherwise send a copy to the wrong place (wrong
    bytes returned as a hit, or written over another chunk); ``seal`` is the CRC-32C of those numbers,
    set by the server (:meth:`sealed`) and checked by the client (:meth:`check_seal`)."""

    seal: p.Crc = 0

    def _numbers(self) -> tuple[Sequence[int], ...]:
        raise NotImplementedError

    def _compute_seal(self) -> int:
        crc = 0
        for values in self._numbers():
            crc = p.checksum(struct.pack(f"<I{len(values)}q", len(values), *values), crc)
        return crc

    def sealed(self) -> Self:
        """This reply with its seal set (the server's side)."""
        self.seal = self._compute_seal()
        return self

    def check_seal(self, address: str) -> None:
        """Raise :class:`ProtocolError` unless the seal matches the numbers (the client's side)."""
        if self.seal != self._compute_seal():
            raise ProtocolError(f"{address}: {type(self).__name__} failed its seal (corrupted in transit)")


class LeaseGetRequest(_Meta):
    """LEASE_GET: the keys to pin."""

    keys: Keys


class LeaseGetReply(_Sealed):
    """Per key: size (-1 miss, -2 deferred), position in the shared region, lease id (0 when none)."""

    sizes: Annotated[list[p.SignedSize], msgspec.Meta(max_length=p.MAX_KEYS)]
    positions: Annotated[list[Position], msgspec.Meta(max_length=p.MAX_KEYS)]
    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=p.MAX_KEYS)]
    #: the leases' lifetime in milliseconds (0: not said); lets a client skip waiting for RELEASE's answer
    ttl_ms: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0

    def _numbers(self) -> tuple[Sequence[int], ...]:
        return (self.sizes, self.positions, self.leases, (self.ttl_ms,))


class ReleaseRequest(_Meta):
    """RELEASE: lease ids to end."""

    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=p.MAX_KEYS)]


class ReleaseReply(_Sealed):
    """Per lease: true when it was still valid (the bytes read under it are good)."""

    valid: Annotated[list[bool], msgspec.Meta(max_length=p.MAX_KEYS)]

    def _numbers(self) -> tuple[Sequence[int], ...]:
        return (self.valid,)


class PutBeginRequest(_Meta):
    """PUT_BEGIN: the sizes of the chunks about to be written."""

    sizes: Annotated[list[p.Size], msgspec.Meta(max_length=p.MAX_KEYS)]


class PutBeginReply(_Sealed):
    """Per chunk: a staging lease and its position (lease 0, position -1: none free now)."""

    leases: Annotated[list[LeaseId], msgspec.Meta(max_length=p.MAX_KEYS)]
    positions: Annotated[list[Position], msgspec.Meta(max_length=p.MAX_KEYS)]

    def _numbers(self) -> tuple[Sequence[int], ...]:
        return (self.leases, self.positions)


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
                reply.check_seal(self.address)
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
                    if size > self.max_payload or lease <= 0 or position < 0:
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
        reply.check_seal(self.address)
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
                reply.check_seal(self.address)
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
