"""The tcp transport (``kvs://``), client side: one blocking socket, zero-copy sends and receives.

Requests go out with one ``socket.sendmsg`` of [header+metadata, payload memoryviews...] (scatter/gather,
no concatenation); reply payloads are read with ``recv_into`` straight into the destination tensor's
memory. Nothing on the data path builds an intermediate ``bytes`` object of chunk data. Call order and
failure semantics: :mod:`kvstrata.transport.base`.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvstrata.core.buffers import byte_view, consume, flat_view
from kvstrata.core.chunk import PrefixResult
from kvstrata.errors import (
    AuthenticationError,
    ChunkTooLargeError,
    ConnectError,
    InvalidArgumentError,
    KVStrataError,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
    VersionMismatchError,
)
from kvstrata.transport import protocol as p
from kvstrata.transport.base import PutSpec, ServerAddress, Transport, TransportOptions

__all__ = ["TcpTransport", "byte_view", "consume", "flat_view"]

#: Linux's IOV_MAX is 1024; stay well below it per sendmsg call.
_MAX_IOV = 512
_DISCARD = 1 << 20
#: Bytes per GET_MANY reply when a batch is split for pipelining: big enough that the per-frame work of
#: both ends (parse, pin, reply) is a small part of moving it; measured at 4 and 16 MiB.
PIPELINE_BYTES = 16 << 20
#: Bytes per PUT_MANY frame (at least one chunk each; see put_many). Measured with bench/ab.py (medians
#: of paired rounds): at 256 KiB chunks, 1 MiB frames moved 1.29x as much as 16 MiB ones without checksums,
#: and 1.10x / 1.15x as much as 4 MiB / 512 KiB ones with them; at 2 MiB chunks with checksums, one chunk
#: a frame 1.24x as much as two.
PUT_FRAME_BYTES = 1 << 20
#: Most bytes one blocking read of a reply payload asks for (``MSG_WAITALL``): a read waiting for many
#: megabytes at once drains the socket less often, and the server's sends stall on a full receive window.
#: Measured with bench/ab.py (medians of paired rounds) against reading all of a reply's chunks in one
#: call: gets of 8 MiB chunks 1.25x as fast with checksums and without, 2 MiB 1.12x / 1.17x, 256 KiB
#: without checksums 1.13x; 128 KiB pieces measured the same as 256 KiB, 1 MiB ones 1.18x / 1.14x at 8 MiB.
RECV_PIECE_BYTES = 256 << 10


class TcpTransport(Transport):
    """A blocking-socket connection speaking the kvs protocol (see the module docstring)."""

    scheme = "kvs"
    name = "tcp"

    def __init__(self, address: ServerAddress, options: TransportOptions) -> None:
        super().__init__(address, options)
        self._sock: socket.socket | None = None
        self._broken = False
        self._next_id = 1
        self._deadline = 0.0
        self._header_buf = bytearray(p.HEADER_SIZE)
        self._chunk_hint = 512 << 10
        self._armed = 0.0
        self.greeting: p.ServerHello | None = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def broken(self) -> bool:
        """True once the connection failed or was closed."""
        return self._broken or self._sock is None

    @property
    def max_payload(self) -> int:
        """The server's payload limit from its greeting."""
        return self.greeting.max_payload if self.greeting is not None else 0

    def close(self) -> None:
        """Close the socket; idempotent."""
        self._broken = True
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # -- low-level I/O with deadline and error translation ----------------------------------------
    def _fail(self, exc: BaseException) -> TransportError:
        """Close the connection and translate ``exc`` into the exception tree."""
        self.close()
        if isinstance(exc, TransportError):
            return exc
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return RequestTimeoutError(f"{self.address}: no reply within the timeout")
        return ConnectError(f"{self.address}: connection lost: {exc}")

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"{self.address}: request timed out")
        return left

    def _sock_or_fail(self) -> socket.socket:
        if self._sock is None or self._broken:
            raise ConnectError(f"{self.address}: not connected")
        return self._sock

    def _arm(self, sock: socket.socket) -> None:
        """Kernel-level send/receive timeouts for what is left of the call's deadline.

        The socket itself stays blocking: a Python-level timeout would poll() before every recv, and
        MSG_WAITALL could not fill a whole chunk in one call.
        """
        left = self._remaining()
        # Re-arm when the call may last longer than armed, or when the armed value overshoots the
        # deadline by more than a little (setsockopt is two syscalls; not worth it per recv).
        if left > self._armed or self._armed - left > max(0.02, 0.1 * left):
            seconds = int(left)
            micros = max(int((left - seconds) * 1e6), 1000 if seconds == 0 else 0)
            timeval = struct.pack("@ll", seconds, micros)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._armed = left

    def _send(self, parts: list[Any]) -> None:
        sock = self._sock_or_fail()
        views = [v for v in map(flat_view, parts) if len(v)]
        while views:
            self._arm(sock)
            try:
                sent = sock.sendmsg(views[:_MAX_IOV])
            except BlockingIOError as exc:  # SO_SNDTIMEO expired
                raise RequestTimeoutError(f"{self.address}: request timed out") from exc
            consume(views, sent)

    def _recv_into(self, view: memoryview) -> None:
        sock = self._sock_or_fail()
        got, total = 0, len(view)
        while got < total:
            self._arm(sock)
            try:
                n = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise RequestTimeoutError(f"{self.address}: request timed out") from exc
            if n == 0:
                raise ConnectError(f"{self.address}: the server closed the connection")
            got += n

    def _recv_many(self, views: list[memoryview]) -> None:
        """Fill ``views`` in turn with ``recvmsg_into`` calls (scatter reads, ``MSG_WAITALL``) of about
        ``RECV_PIECE_BYTES`` each: several small views, or a piece of a large one."""
        sock = self._sock_or_fail()
        cap = RECV_PIECE_BYTES
        index, count = 0, len(views)
        while index < count:
            self._arm(sock)
            batch: list[memoryview] = []
            want = 0
            for i in range(index, min(count, index + _MAX_IOV)):
                view = views[i]
                if want + len(view) > cap:
                    if not batch or want < cap // 2:
                        batch.append(view[: cap - want])  # a piece of a large view
                        want = cap
                    break
                batch.append(view)
                want += len(view)
            try:
                n = sock.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise RequestTimeoutError(f"{self.address}: request timed out") from exc
            if n == 0 and want:
                raise ConnectError(f"{self.address}: the server closed the connection")
            while index < count and n >= len(views[index]):  # skip what is full, resume inside the next
                n -= len(views[index])
                index += 1
            if n:
                views[index] = views[index][n:]

    def _discard(self, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, _DISCARD)))
        while nbytes:
            step = min(nbytes, len(scratch))
            self._recv_into(scratch[:step])
            nbytes -= step

    def _read_header(self, *, expect_version: int | None = p.PROTOCOL_VERSION) -> p.Header:
        self._recv_into(memoryview(self._header_buf))
        limit = max(self.max_payload, 0)
        return p.parse_header(self._header_buf, limit, expect_version=expect_version)

    def _read_meta(self, header: p.Header, kind: type[Any] | None = None) -> Any:
        raw = bytearray(header.meta_len)
        self._recv_into(memoryview(raw))
        return p.decode_meta(header.opcode, header.is_reply, raw, kind=kind)

    def _request(
        self, opcode: int, meta: Any, payload: Sequence[Any] = (), *, flags: int = 0, crc: int = 0
    ) -> int:
        rid = self._next_id
        self._next_id += 1
        raw = p.encode_meta(meta)
        views = [flat_view(x) for x in payload]
        size = sum(len(v) for v in views)
        head = p.pack_header(opcode, rid, len(raw), size, flags=flags, checksum=crc)
        self._send([head + raw, *views])
        return rid

    def _reply(self, rid: int, opcode: int) -> tuple[p.Header, Any]:
        """Read one reply's header and metadata; raises the mapped exception for an ERROR reply."""
        header = self._read_header()
        if not header.is_reply or header.request_id != rid:
            raise ProtocolError(f"{self.address}: reply for request {header.request_id}, expected {rid}")
        if header.opcode == p.Op.ERROR:
            err = self._read_meta(header)
            self._discard(header.payload_len)
            error = p.error_for(err)
            if isinstance(error, (ProtocolError, AuthenticationError)):
                raise self._fail(error)
            raise error
        if header.opcode != opcode:
            raise ProtocolError(f"{self.address}: reply opcode 0x{header.opcode:02x} to 0x{opcode:02x}")
        return header, self._read_meta(header)

    def _call(self, timeout: float, fn: Any, *args: Any) -> Any:
        """Run one exchange under a deadline; connection-level failures break the transport."""
        self._deadline = time.monotonic() + timeout
        try:
            return fn(*args)
        except (ProtocolError, ConnectError, RequestTimeoutError) as exc:
            raise self._fail(exc) from exc
        except OSError as exc:
            raise self._fail(exc) from exc
        except KVStrataError:
            raise

    # -- handshake ---------------------------------------------------------------------------------
    def connect(self, timeout: float) -> None:
        """Open the connection and run the HELLO handshake (version check, optional HMAC auth)."""
        if self._sock is not None:
            return
        budget = min(timeout, self.options.connect_timeout)
        try:
            sock = socket.create_connection((self.address.host, self.address.port), timeout=budget)
        except OSError as exc:
            self._broken = True
            raise ConnectError(f"cannot connect to {self.address}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)  # blocking; deadlines are enforced by SO_RCVTIMEO / SO_SNDTIMEO (_arm)
        self._armed = 0.0
        self._sock = sock
        self._broken = False
        self._call(timeout, self._handshake)

    def _handshake(self) -> None:
        header = self._read_header(expect_version=None)
        if header.version != p.PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"{self.address} speaks kvs protocol version {header.version}; "
                f"this client speaks version {p.PROTOCOL_VERSION}"
            )
        if header.opcode != p.Op.HELLO or header.request_id != 0 or header.payload_len:
            raise ProtocolError(f"{self.address}: no greeting from the server (is it a kvstrata server?)")
        greeting: p.ServerHello = self._read_meta(header, kind=p.ServerHello)
        if greeting.version != p.PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"{self.address} speaks kvs protocol version {greeting.version}; "
                f"this client speaks version {p.PROTOCOL_VERSION}"
            )
        token = self.options.token
        if greeting.auth and not token:
            raise AuthenticationError(f"{self.address} requires a token and none was given")
        nonce = os.urandom(p.NONCE_BYTES)
        proof = p.auth_proof(token, greeting.nonce, nonce, server=False) if token and greeting.auth else b""
        hello = p.ClientHello(
            version=p.PROTOCOL_VERSION,
            client=self.options.client_name,
            nonce=nonce,
            proof=proof,
            transport=self.name,
        )
        self.greeting = greeting
        rid = self._request(p.Op.HELLO, hello)
        _, reply = self._reply(rid, p.Op.HELLO)
        if token and greeting.auth:
            import hmac

            expected = p.auth_proof(token, nonce, greeting.nonce, server=True)
            if not hmac.compare_digest(expected, reply.proof):
                raise AuthenticationError(f"{self.address} failed to prove it knows the token")
        self.on_hello(greeting, reply)

    def on_hello(self, greeting: p.ServerHello, reply: p.HelloReply) -> None:
        """Hook for subclasses (shm, nixl) to read their extension data from the greeting."""

    # -- operations --------------------------------------------------------------------------------
    def put_many(self, items: Sequence[PutSpec], timeout: float) -> list[KVStrataError | None]:
        """PUT_MANY, pipelined: frames of about ``PUT_FRAME_BYTES`` go out back to back (the server stores
        one while the next is on the wire and the client checksums the one after), then the small replies
        are read in order."""
        results: list[KVStrataError | None] = [None] * len(items)
        limit = self.max_payload
        # Small frames: the server commits each frame as soon as its payload is in (while the next one
        # arrives), so a run ends with a small commit, and with checksums the CRC pass over one frame (its
        # CRCs lead its metadata) overlaps with the server receiving the frame before.
        target = min(limit, PUT_FRAME_BYTES)
        batches: list[list[int]] = []
        batch: list[int] = []
        size = 0
        for i, item in enumerate(items):
            n = item.data.numel()
            if n > limit:
                results[i] = ChunkTooLargeError(f"a {n}-byte chunk exceeds the server's {limit}-byte limit")
                continue
            if batch and (size + n > target or len(batch) >= p.MAX_KEYS):
                batches.append(batch)
                batch, size = [], 0
            batch.append(i)
            size += n
        if batch:
            batches.append(batch)
        if batches:
            self._call(timeout, self._put_pipelined, items, batches, results)
        return results

    def _put_pipelined(
        self, items: Sequence[PutSpec], batches: list[list[int]], results: list[KVStrataError | None]
    ) -> None:
        want_crc = self.options.checksum
        flags = p.Flag.CHECKSUM if want_crc else 0
        sent: list[tuple[int, list[int]]] = []
        for batch in batches:
            views = [byte_view(items[i].data) for i in batch]
            wire = [
                p.PutItem(
                    key=items[i].key,
                    size=len(view),
                    checksum=p.checksum(view) if want_crc else 0,
                    meta=p.wire_meta(items[i].meta),
                )
                for i, view in zip(batch, views, strict=True)
            ]
            sent.append(
                (self._request(p.Op.PUT_MANY, p.PutManyRequest(items=wire), views, flags=flags), batch)
            )
        for rid, batch in sent:
            _, reply = self._reply(rid, p.Op.PUT_MANY)
            if len(reply.results) != len(batch):
                raise ProtocolError(f"{self.address}: PUT_MANY reply has {len(reply.results)} results")
            for i, code in zip(batch, reply.results, strict=True):
                if code:
                    results[i] = p.error_for(p.ErrorReply(code=code, message=f"put of item {i}"))

    def get_many(
        self, keys: Sequence[bytes], outs: Sequence[torch.Tensor | None], timeout: float
    ) -> list[torch.Tensor | None]:
        """GET_MANY, pipelined: all requests (a few chunks each) go out at once, replies are read in
        order straight into the destinations; deferred keys (the server's reply budget ran out) are
        asked for again."""
        results: list[torch.Tensor | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        while pending:
            deferred = self._call(timeout, self._get_pipelined, keys, outs, pending, results)
            if len(deferred) == len(pending):
                raise ProtocolError(f"{self.address}: GET_MANY made no progress")
            pending = deferred
        return results

    def _get_pipelined(
        self,
        keys: Sequence[bytes],
        outs: Sequence[torch.Tensor | None],
        pending: list[int],
        results: list[torch.Tensor | None],
    ) -> list[int]:
        flags = p.Flag.CHECKSUM if self.options.checksum else 0
        # Keys per request from the chunk size seen last, so each reply is about PIPELINE_BYTES.
        per = max(1, min(p.MAX_KEYS, PIPELINE_BYTES // max(self._chunk_hint, 1)))
        sent: list[tuple[int, list[int]]] = []
        for start in range(0, len(pending), per):
            batch = pending[start : start + per]
            sent.append(
                (
                    self._request(p.Op.GET_MANY, p.KeysRequest(keys=[keys[i] for i in batch]), flags=flags),
                    batch,
                )
            )
        deferred: list[int] = []
        too_small: InvalidArgumentError | None = None
        for rid, batch in sent:
            error = self._read_get_reply(rid, batch, outs, results, deferred)
            too_small = too_small or error
        if too_small is not None:
            raise too_small
        return deferred

    def _read_get_reply(
        self,
        rid: int,
        batch: list[int],
        outs: Sequence[torch.Tensor | None],
        results: list[torch.Tensor | None],
        deferred: list[int],
    ) -> InvalidArgumentError | None:
        header, reply = self._reply(rid, p.Op.GET_MANY)
        sizes = reply.sizes
        crcs = reply.checksums if header.has_checksum else []
        if self.options.checksum and not crcs and header.payload_len:
            # asked for and always sent: a reply without them was corrupted (a flipped flag bit)
            raise ProtocolError(f"{self.address}: GET_MANY reply lacks the checksums it was asked for")
        if len(sizes) != len(batch) or (crcs and len(crcs) != len(batch)):
            raise ProtocolError(f"{self.address}: GET_MANY reply does not match the request")
        if sum(s for s in sizes if s > 0) != header.payload_len:
            raise ProtocolError(f"{self.address}: GET_MANY payload length does not match its sizes")
        too_small: InvalidArgumentError | None = None
        # Where each chunk goes (a chunk that does not fit its ``out`` is read into scratch and dropped).
        views: list[memoryview] = []
        owners: list[tuple[int, int, torch.Tensor] | None] = []  # per view: (pos, i, dest) or scratch
        scratch: memoryview | None = None
        for pos, (i, size) in enumerate(zip(batch, sizes, strict=True)):
            if size == -2:
                deferred.append(i)
                continue
            if size < 0:
                continue
            self._chunk_hint = size
            out = outs[i]
            if out is None:
                dest = torch.empty(size, dtype=torch.uint8)
            else:
                dest = (
                    out.reshape(-1).view(torch.uint8)
                    if out.dtype is not torch.uint8 or out.dim() != 1
                    else out
                )
                have = dest.numel()
                if have < size:
                    too_small = InvalidArgumentError(f"out holds {have} bytes, the chunk has {size}")
                    if scratch is None:
                        scratch = memoryview(bytearray(min(size, _DISCARD)))
                    for start in range(0, size, len(scratch)):
                        views.append(scratch[: min(len(scratch), size - start)])
                        owners.append(None)
                    continue
                if have != size:
                    dest = dest[:size]
            views.append(byte_view(dest))
            owners.append((pos, i, dest))
        if not crcs:
            self._recv_many(views)  # scatter reads of several chunks (or pieces of one) each
            for owner in owners:
                if owner is not None:
                    results[owner[1]] = owner[2]
            return too_small
        # With checksums: chunk by chunk, each checked piece by piece right after the piece lands (still
        # in cache).
        piece = RECV_PIECE_BYTES
        for view, owner in zip(views, owners, strict=True):
            if owner is None:
                self._recv_many([view])
                continue
            crc = 0
            for start in range(0, len(view), piece):
                part = view[start : start + piece]
                self._recv_many([part])
                crc = p.checksum(part, crc)
            pos, i, dest = owner
            if crc != crcs[pos]:
                self.corrupt += 1
                continue  # corrupt bytes are a miss, never a hit
            results[i] = dest
        return too_small

    def _keys_op(self, opcode: int, keys: Sequence[bytes]) -> Any:
        rid = self._request(opcode, p.KeysRequest(keys=list(keys)))
        _, reply = self._reply(rid, opcode)
        return reply

    def exists(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        """EXISTS, one round trip per 4,096 keys."""
        out: list[bool] = []
        for start in range(0, len(keys), p.MAX_KEYS):
            part = keys[start : start + p.MAX_KEYS]
            reply = self._call(timeout, self._keys_op, p.Op.EXISTS, part)
            if len(reply.present) != len(part):
                raise self._fail(ProtocolError(f"{self.address}: EXISTS reply does not match"))
            out += reply.present
        return out

    def delete(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        """DELETE, one round trip per 4,096 keys."""
        out: list[bool] = []
        for start in range(0, len(keys), p.MAX_KEYS):
            part = keys[start : start + p.MAX_KEYS]
            reply = self._call(timeout, self._keys_op, p.Op.DELETE, part)
            if len(reply.removed) != len(part):
                raise self._fail(ProtocolError(f"{self.address}: DELETE reply does not match"))
            out += reply.removed
        return out

    def lookup_prefix(self, keys: Sequence[bytes], timeout: float) -> PrefixResult:
        """LOOKUP_PREFIX: one round trip per 4,096 keys (the walk stops at the first gap)."""
        count = 0
        tiers: list[str] = []
        for start in range(0, len(keys), p.MAX_KEYS):
            part = keys[start : start + p.MAX_KEYS]
            reply = self._call(timeout, self._keys_op, p.Op.LOOKUP_PREFIX, part)
            if reply.num_chunks > len(part) or len(reply.tiers) != reply.num_chunks:
                raise self._fail(ProtocolError(f"{self.address}: LOOKUP_PREFIX reply does not match"))
            count += reply.num_chunks
            tiers += reply.tiers
            if reply.num_chunks < len(part):
                break
        return PrefixResult(count, tuple(tiers))

    def stats(self, timeout: float) -> dict[str, Any]:
        """STATS."""

        def run() -> Any:
            rid = self._request(p.Op.STATS, p.Empty())
            return self._reply(rid, p.Op.STATS)[1]

        reply = self._call(timeout, run)
        return {"tiers": dict(reply.tiers), "server": dict(reply.server)}

    def ping(self, timeout: float) -> float:
        """PING; returns the round-trip time in seconds."""

        def run() -> float:
            start = time.perf_counter()
            rid = self._request(p.Op.PING, p.Empty())
            self._reply(rid, p.Op.PING)
            return time.perf_counter() - start

        return float(self._call(timeout, run))
