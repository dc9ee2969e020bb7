"""One client connection of the cache server: framed reads into caller-supplied memory, gathered writes.

Sockets are driven directly (non-blocking ``recv_into`` / ``sendmsg`` plus loop readiness callbacks)
rather than through asyncio streams, so that put payloads are read straight into their destination (a slot
reserved in the Store's top tier, or a reused per-connection buffer; never a growing stream buffer), chunk
replies go out with one ``sendmsg`` of [header+metadata, pinned slot views...], and back-pressure is TCP's
own: a reply that cannot be written within ``write_timeout`` closes that connection alone.

A connection needs a few things of the server that owns it; :class:`ServerContext` names them, so that
the handlers (:mod:`kvstrata.server.handlers`, the transport extensions) depend on this module and never on
the server's own (:mod:`kvstrata.server.app` imports them all).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import torch
from prometheus_client import Counter

from kvstrata.core.buffers import consume, flat_view
from kvstrata.errors import (
    ProtocolError,
    RequestTimeoutError,
)
from kvstrata.kvstore.store import Store
from kvstrata.transport import protocol as p

__all__ = ["ConnectionClosed", "ServerConnection", "ServerContext"]


log = logging.getLogger(__name__)
_ERRORS = Counter("kvstrata_server_errors", "Error replies sent, by code", ["code"])
_BYTES_IN = Counter("kvstrata_server_payload_bytes_received", "Payload bytes received")
_BYTES_OUT = Counter("kvstrata_server_payload_bytes_sent", "Payload bytes sent")
_REPLY = int(p.Flag.REPLY)
_CHECKSUM = int(p.Flag.CHECKSUM)
_STAGING = 64 * 1024
#: Largest receive buffer a connection keeps between requests.
_KEEP_BUFFER = 8 << 20
_MAX_IOV = 512
#: Payload reads of more than this many bytes run as blocking calls on a bulk I/O thread (see ``_offload``)
#: while another connection is also being served. A hand-off to a thread and back costs tens of
#: microseconds, a sizable part of reading one MiB, so a client's 1 MiB put frames (tcp.PUT_FRAME_BYTES)
#: stay on the loop (measured with bench/ab.py: the same either way on 2 cores, within the noise).
_BULK_BYTES = 1 << 20
#: Longest a blocking call on a bulk I/O thread waits for its peer before handing back to the event loop.
_BULK_SLICE_S = 0.5
#: Largest piece a bulk read takes at once (checksummed while it is still in cache).
_PIECE = 1 << 20
#: Largest SO_RCVLOWAT asked for while a payload is awaited.
_LOWAT_CAP = 1 << 20
T = TypeVar("T")


class ServerContext(Protocol):
    """What a connection and the request handlers use of the server that owns them."""

    store: Store
    max_payload: int
    max_inflight_bytes: int
    write_timeout: float
    started_at: float
    counters: dict[str, int]
    #: connections with a request being served now (see :attr:`ServerConnection.busy`)
    busy_connections: int
    #: bulk I/O threads free now (see :meth:`ServerConnection._offload`)
    bulk_slots: threading.BoundedSemaphore

    @property
    def offloads(self) -> bool:
        """Whether Store calls run on worker threads (a disk tier may block) rather than inline."""

    async def run_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a Store call: inline for memory tiers, on a worker thread when a disk tier may block."""

    def bulk_executor(self) -> ThreadPoolExecutor:
        """The bulk I/O threads, started on first use."""


class ConnectionClosed(Exception):
    """The peer went away or the connection was closed on purpose."""


class ServerConnection:
    """One client connection: framed reads into caller-supplied memory, scatter/gather writes.

    Extension handlers use :meth:`read_payload_into`, :meth:`skip_payload`, :meth:`reply` and
    :meth:`error`; :attr:`store` and :attr:`server` give them the rest.
    """

    def __init__(self, server: ServerContext, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.store = server.store
        self.sock = sock
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.transport_name = "tcp"
        self._staging = bytearray(_STAGING)
        self._start = 0
        self._end = 0
        self._recv_buffer: torch.Tensor | None = None
        #: payload bytes of the current request not yet consumed
        self.payload_left = 0
        self._busy = False
        self._lowat = 1
        self._timeouts_set = False
        self._bulk: concurrent.futures.Future[int] | None = None  # the last transfer on a bulk thread

    @property
    def busy(self) -> bool:
        """Whether a request of this connection is being served (counted in ``server.busy_connections``)."""
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        if value != self._busy:
            self._busy = value
            self.server.busy_connections += 1 if value else -1

    # -- readiness -----------------------------------------------------------------------------------
    async def _wait(self, writable: bool, timeout: float | None) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()
        if fd < 0:
            raise ConnectionClosed("socket closed")

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(
                    RequestTimeoutError("peer did not read its replies within the write timeout")
                )

        if writable:
            self.loop.add_writer(fd, ready)
        else:
            self.loop.add_reader(fd, ready)
        # A timer rather than asyncio.wait_for: no extra task per wait on the data path.
        timer = self.loop.call_later(timeout, expire) if timeout is not None else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            if writable:
                self.loop.remove_writer(fd)
            else:
                self.loop.remove_reader(fd)

    # -- reading -------------------------------------------------------------------------------------
    def _set_lowat(self, want: int) -> None:
        """Wake the reader only once ``want`` bytes are queued (capped; the kernel also wakes it when the
        receive window fills): one wakeup per large piece rather than one per burst of segments."""
        lowat = max(1, min(want, _LOWAT_CAP))
        if lowat != self._lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            except OSError:
                return  # not supported here: wakeups stay per burst
            self._lowat = lowat

    async def _recv_some(self, views: list[memoryview], want: int = 1) -> int:
        """Bytes read into ``views`` in turn (a scatter read), waiting until ``want`` are queued."""
        while True:
            try:
                n = self.sock.recvmsg_into(views)[0]
            except (BlockingIOError, InterruptedError):
                self._set_lowat(want)
                await self._wait(False, None)
                continue
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            if n == 0:
                raise ConnectionClosed("peer closed the connection")
            return n

    async def recv_exact(self, view: memoryview) -> None:
        """Fill ``view``: first from bytes already staged, then straight from the socket."""
        got = 0
        staged = self._end - self._start
        if staged:
            got = min(staged, len(view))
            view[:got] = self._staging[self._start : self._start + got]
            self._start += got
        while got < len(view):
            got += await self._recv_some([view[got:]], len(view) - got)

    async def _fill(self, nbytes: int) -> memoryview:
        """At least ``nbytes`` (<= staging size) staged; returns a view of exactly them and consumes them."""
        if self._end - self._start < nbytes:
            if self._start:
                rest = self._end - self._start
                self._staging[:rest] = self._staging[self._start : self._end]
                self._start, self._end = 0, rest
            view = memoryview(self._staging)
            while self._end - self._start < nbytes:
                self._end += await self._recv_some([view[self._end :]], nbytes - (self._end - self._start))
        out = memoryview(self._staging)[self._start : self._start + nbytes]
        self._start += nbytes
        return out

    async def read_header(self, *, expect_version: int | None = p.PROTOCOL_VERSION) -> p.Header:
        """The next frame's validated header."""
        raw = await self._fill(p.HEADER_SIZE)
        header = p.parse_header(raw, self.server.max_payload, expect_version=expect_version)
        self.payload_left = header.payload_len
        return header

    async def read_meta(self, header: p.Header, kind: type[Any] | None = None) -> Any:
        """The frame's decoded metadata (bounded by ``MAX_META_BYTES`` before any allocation)."""
        if header.meta_len <= _STAGING:
            raw: Any = await self._fill(header.meta_len)
        else:
            raw = bytearray(header.meta_len)
            await self.recv_exact(memoryview(raw))
        return p.decode_meta(header.opcode, header.is_reply, raw, kind=kind)

    async def read_payload_into(self, view: memoryview) -> None:
        """Read the next ``len(view)`` payload bytes of the current request into ``view``."""
        if len(view) > self.payload_left:
            raise ProtocolError("payload shorter than its metadata says")
        self.payload_left -= len(view)
        await self.recv_exact(view)
        _BYTES_IN.inc(len(view))

    async def read_payload_many(self, views: Sequence[memoryview], checksum: bool = False) -> list[int]:
        """Read the next payload bytes of the current request into ``views``, in turn; returns the CRC-32C
        of each view when ``checksum`` (else ``[]``).

        One ``recvmsg_into`` fills as many views as the socket has bytes for (scatter read), and the
        receive low-water mark makes each wakeup bring a large piece, so a frame of many chunks costs a
        few system calls and loop wakeups rather than several per chunk. Checksums are computed piece by
        piece as bytes arrive (each piece still in cache: no second pass over the chunk).
        """
        total = sum(len(v) for v in views)
        if total > self.payload_left:
            raise ProtocolError("payload shorter than its metadata says")
        self.payload_left -= total
        crcs = [0] * len(views) if checksum else []
        index, offset = 0, 0  # the view being filled and how far
        while index < len(views) and not len(views[index]):
            index += 1

        def advance(n: int) -> None:
            nonlocal index, offset
            while n:
                view = views[index]
                step = min(n, len(view) - offset)
                if checksum:
                    crcs[index] = p.checksum(view[offset : offset + step], crcs[index])
                offset += step
                n -= step
                if offset == len(view):
                    index, offset = index + 1, 0
                    while index < len(views) and not len(views[index]):
                        index += 1

        staged = min(self._end - self._start, total)
        if staged:
            buf = memoryview(self._staging)
            got = 0
            while got < staged:
                view = views[index]
                step = min(staged - got, len(view) - offset)
                view[offset : offset + step] = buf[self._start + got : self._start + got + step]
                got += step
                advance(step)
            self._start += staged
        left = total - staged

        def pump() -> int:
            """Blocking reads on a worker thread (see :meth:`_offload`), a view at a time in pieces of at
            most ``_PIECE`` bytes (each checksummed while in cache); the bytes read."""
            got = 0
            while got < left:
                view = views[index]
                piece = view[offset : offset + min(len(view) - offset, _PIECE)]
                try:
                    n = self.sock.recv_into(piece, len(piece), socket.MSG_WAITALL)
                except (BlockingIOError, InterruptedError):
                    break  # the time slice ran out: the event loop goes on
                except OSError as exc:
                    raise ConnectionClosed(str(exc)) from exc
                if n == 0:
                    raise ConnectionClosed("peer closed the connection")
                got += n
                advance(n)
            return got

        if left > _BULK_BYTES and self.server.busy_connections > 1:
            moved = await self._offload(pump)
            if moved is not None:
                left -= moved
                if left:
                    self.server.counters["bulk_handbacks"] += 1
        while left:
            n = await self._recv_some([views[index][offset:], *views[index + 1 : index + _MAX_IOV]], left)
            left -= n
            advance(n)
        _BYTES_IN.inc(total)
        return crcs

    async def skip_payload(self) -> None:
        """Discard what is left of the current request's payload (keeps the stream in sync)."""
        if self.payload_left:
            scratch = memoryview(bytearray(min(self.payload_left, 1 << 20)))
            while self.payload_left:
                step = min(self.payload_left, len(scratch))
                await self.read_payload_into(scratch[:step])

    def receive_buffer(self, nbytes: int) -> torch.Tensor:
        """A reusable per-connection buffer of at least ``nbytes`` (bounded by the payload limit)."""
        buf = self._recv_buffer
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
            # Kept for the next request only up to _KEEP_BUFFER bytes (a pipelining client's frames are
            # smaller), so an idle connection never pins more than that.
            self._recv_buffer = buf if nbytes <= _KEEP_BUFFER else None
        return buf[:nbytes]

    # -- writing -------------------------------------------------------------------------------------
    async def send(self, parts: Sequence[Any]) -> None:
        """Write every part with scatter/gather ``sendmsg`` from the event loop; waits (bounded by
        ``write_timeout_s``) while the peer is not reading.

        Replies are written here rather than by blocking calls on a bulk I/O thread: handing large replies
        to a thread to write in the background made GETs 1.3-1.4x slower (bench/ab.py against a revision
        that did, at 256 KiB and 8 MiB chunks) than non-blocking writes driven by the loop's readiness
        callbacks.
        """
        views = [v for v in map(flat_view, parts) if len(v)]
        timeout = self.server.write_timeout
        while views:
            try:
                sent = self.sock.sendmsg(views[:_MAX_IOV])
            except (BlockingIOError, InterruptedError):
                await self._wait(True, timeout)
                continue
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            consume(views, sent)

    def _set_timeouts(self) -> None:
        """The time slice of blocking reads on bulk I/O threads (set once; ignored while non-blocking)."""
        if not self._timeouts_set:
            timeval = struct.pack("@ll", int(_BULK_SLICE_S), int(_BULK_SLICE_S % 1 * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self._timeouts_set = True

    async def _offload(self, pump: Callable[[], int]) -> int | None:
        """Run ``pump`` (blocking socket I/O) on one of the server's bulk I/O threads and return what it
        returns; ``None`` at once when none is free (the caller then does the I/O on the event loop).

        Why: a kernel copy of megabytes is most of a large request's cost. Done by blocking calls on a
        thread, it runs without the GIL, so several connections' copies run on several cores at once.
        Only then is it worth the hand-offs (a thread wakeup, a future chained back to the loop): the
        caller offloads only while another connection is being served too. A lone client's payloads are
        read on the event loop, which has nothing else to do (measured with bench/ab.py, one client,
        medians of paired rounds, against always offloading: checksummed puts of 2 MiB chunks 1.15x and
        of 8 MiB 1.12x as fast; see docs/server.md). The socket is blocking only while the thread
        holds it (nothing else touches it then: its connection's coroutine is waiting here), and each
        blocking read gives up after ``_BULK_SLICE_S`` (SO_RCVTIMEO), so a peer that stalls holds a thread
        no longer than that; the caller finishes such a transfer on the event loop.
        """
        server = self.server
        if not server.bulk_slots.acquire(blocking=False):
            return None
        server.counters["bulk_transfers"] += 1
        sock = self.sock
        try:
            self._set_timeouts()
            future = server.bulk_executor().submit(_blocking, sock, pump)
        except BaseException:
            server.bulk_slots.release()
            raise
        future.add_done_callback(lambda _: server.bulk_slots.release())
        self._bulk = future
        return await asyncio.wrap_future(future)

    def wait_bulk(self) -> None:
        """Wake and wait for a bulk transfer still running on a thread (before the socket is closed: a
        thread must never go on with a closed, maybe reused, descriptor)."""
        future = self._bulk
        if future is None or future.done():
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # its blocking call returns at once
        with contextlib.suppress(Exception):
            future.result(timeout=2 * _BULK_SLICE_S)

    async def reply(
        self,
        opcode: int,
        request_id: int,
        meta: Any,
        payload: Sequence[Any] = (),
        *,
        checksum: int | None = None,
        flags: int = 0,
    ) -> None:
        """Send one reply frame (``checksum``: the payload's CRC-32C, sets the CHECKSUM flag)."""
        raw = p.encode_meta(meta)
        views = [flat_view(x) for x in payload]
        size = sum(len(v) for v in views)
        flags |= _REPLY
        if checksum is not None:
            flags |= _CHECKSUM
        head = p.pack_header(opcode, request_id, len(raw), size, flags=flags, checksum=checksum or 0)
        await self.send([head + raw, *views])
        _BYTES_OUT.inc(size)

    async def error(self, request_id: int, code: str, message: str) -> None:
        """Send a typed ERROR reply."""
        _ERRORS.labels(code=code).inc()
        await self.reply(p.Op.ERROR, request_id, p.ErrorReply(code=code, message=message[:4000]))


def _blocking(sock: socket.socket, pump: Callable[[], int]) -> int:
    """``pump()`` with ``sock`` blocking (on a bulk I/O thread)."""
    sock.setblocking(True)
    try:
        return pump()
    finally:
        with contextlib.suppress(OSError):  # shut down under it (wait_bulk): nothing left to restore
            sock.setblocking(False)
