"""The cache server: an asyncio kvs protocol server (uvloop when installed) in front of a :class:`Store`.

One coroutine per connection (:class:`~kvstrata.server.connection.ServerConnection`) reads frames and
answers them in order (pipelined clients keep many requests in flight; replies carry the request id).
Sockets are driven directly rather than through asyncio streams, so that:

- put payloads are read straight into their destination: slots reserved in the Store's top tier
  (``Store.reserve``), committed once the bytes are in and their checksum holds, aborted otherwise
  (nothing partial is ever visible); only when no slot can be reserved, into a reused per-connection
  buffer and then put (one copy more). Never a growing stream buffer;
- chunk replies are sent with one ``sendmsg`` of [header+metadata, pinned slot views...] while the chunks
  are pinned, so nothing is copied and a slow reader holds no server memory beyond its pins;
- back-pressure is TCP's own: a connection whose replies are not being read stops being read, its pins
  are bounded by ``max_inflight_bytes``, and a reply that cannot be written within ``write_timeout_s``
  closes that connection. Other connections are unaffected.

Transport extensions (shm, nixl) add opcodes through :class:`kvstrata.server.extension.ServerExtension`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

from kvstrata import __version__
from kvstrata.errors import (
    ConnectError,
    InvalidArgumentError,
    KVStrataError,
    ProtocolError,
    RequestTimeoutError,
)
from kvstrata.kvstore.store import Store
from kvstrata.server.connection import ConnectionClosed, ServerConnection
from kvstrata.server.extension import ServerExtension
from kvstrata.server.handlers import HANDLERS
from kvstrata.transport import protocol as p

__all__ = ["CacheServer"]

log = logging.getLogger(__name__)

_REQUESTS = Counter("kvstrata_server_requests", "Requests served, by opcode", ["op"])
_CONNECTIONS = Gauge("kvstrata_server_connections", "Open client connections")

T = TypeVar("T")
_HELLO_TIMEOUT_S = 5.0

Handler = Callable[[ServerConnection, p.Header, Any], Awaitable[None]]


class CacheServer:
    """The kvs protocol server in front of ``store``. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        store: Store,
        *,
        host: str = "127.0.0.1",
        port: int = 7470,
        token: bytes | None = None,
        max_payload: int = 256 * 1024**2,
        max_connections: int = 1024,
        max_inflight_bytes: int = 64 * 1024**2,
        write_timeout: float = 30.0,
        extensions: Sequence[ServerExtension] = (),
        bulk_threads: int = 8,
    ) -> None:
        self.store = store
        #: the global block index this server's tiers are published to (set by the daemon), or None
        self.index: Any = None
        self.host = host
        self.port = port
        self.token = token or None
        self.max_payload = max_payload
        self.max_connections = max_connections
        self.max_inflight_bytes = max(max_inflight_bytes, 1)
        self.write_timeout = write_timeout
        self.extensions = list(extensions)
        self.started_at = time.time()
        self.counters = {
            "connections": 0,
            "connections_total": 0,
            "requests": 0,
            "errors": 0,
            "refused": 0,
            # transfers moved on bulk I/O threads, and those a stalled peer handed back to the event loop
            "bulk_transfers": 0,
            "bulk_handbacks": 0,
        }
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: dict[asyncio.Task[None], ServerConnection | None] = {}
        #: connections with a request being served now (see ServerConnection.busy)
        self.busy_connections = 0
        self._closing = False
        # Disk tiers block (reads on a hit, demotion writes on a put): their calls run on worker threads
        # so that one slow disk never stalls the event loop. Memory-only stores run inline (no hop).
        self._offload = any(t.name not in ("host", "device") for t in store.tiers)
        self._executor: ThreadPoolExecutor | None = None
        #: bulk I/O threads (see ServerConnection._offload); with none free the event loop does the I/O
        if bulk_threads < 0:
            raise InvalidArgumentError(f"bulk_threads must be 0 or more, got {bulk_threads}")
        self.bulk_slots = threading.BoundedSemaphore(bulk_threads)
        self._bulk_threads = bulk_threads
        self._bulk_executor: ThreadPoolExecutor | None = None
        self._handlers: dict[int, Handler] = dict(HANDLERS)
        for ext in self.extensions:
            for opcode, handler in ext.handlers().items():
                if opcode not in p.EXTENSION_OPS or opcode in self._handlers:
                    raise InvalidArgumentError(f"extension {ext.name}: opcode 0x{opcode:02x} is not free")
                self._handlers[opcode] = handler

    @property
    def offloads(self) -> bool:
        """Whether Store calls run on worker threads (a disk tier may block) rather than inline."""
        return self._offload

    async def run_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a Store call: inline for memory tiers, on a worker thread when a disk tier may block."""
        if not self._offload:
            return fn(*args)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstrata-store")
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))

    @property
    def ready(self) -> bool:
        """Listening and not shutting down."""
        return self._sock is not None and not self._closing

    @property
    def transports(self) -> list[str]:
        """Transport names offered."""
        return ["tcp", *(ext.name for ext in self.extensions)]

    async def start(self) -> None:
        """Bind and start accepting connections."""
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(min(self.max_connections, 4096))
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish (up to ``grace`` seconds); close connections."""
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(BaseException):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()
        for task, conn in list(self._tasks.items()):
            if conn is None or not conn.busy:
                task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for ext in self.extensions:
            try:
                ext.close()
            except Exception:
                log.exception("closing transport extension %s failed", ext.name)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._bulk_executor is not None:
            self._bulk_executor.shutdown(wait=True)

    def bulk_executor(self) -> ThreadPoolExecutor:
        """The bulk I/O threads, started on first use."""
        if self._bulk_executor is None:
            self._bulk_executor = ThreadPoolExecutor(
                max_workers=self._bulk_threads, thread_name_prefix="kvstrata-io"
            )
        return self._bulk_executor

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                client, peer = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            if len(self._tasks) >= self.max_connections:
                self.counters["refused"] += 1
                client.close()
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve(client, peer))
            self._tasks[task] = None
            task.add_done_callback(self._tasks.pop)

    async def _serve(self, sock: socket.socket, peer: Any) -> None:
        conn = ServerConnection(self, sock, peer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = conn
        self.counters["connections"] += 1
        self.counters["connections_total"] += 1
        _CONNECTIONS.inc()
        try:
            if await self._handshake(conn):
                await self._request_loop(conn)
        except (ConnectionClosed, RequestTimeoutError) as exc:
            log.debug("connection %s closed: %s", peer, exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection %s failed", peer)
        finally:
            conn.busy = False
            self.counters["connections"] -= 1
            _CONNECTIONS.dec()
            for ext in self.extensions:
                try:
                    ext.connection_closed(conn)
                except Exception:
                    log.exception("transport extension %s: connection_closed failed", ext.name)
            conn.wait_bulk()
            sock.close()

    async def _handshake(self, conn: ServerConnection) -> bool:
        nonce = os.urandom(p.NONCE_BYTES)
        greeting = p.ServerHello(
            version=p.PROTOCOL_VERSION,
            server=f"kvstrata/{__version__}",
            nonce=nonce,
            auth=self.token is not None,
            max_payload=self.max_payload,
            max_keys=p.MAX_KEYS,
            transports=self.transports,
            extensions={ext.name: ext.greeting() for ext in self.extensions if ext.greeting() is not None},
        )
        await conn.reply(p.Op.HELLO, 0, greeting)
        try:
            header = await asyncio.wait_for(conn.read_header(expect_version=None), _HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False
        except ProtocolError as exc:
            await conn.error(0, "protocol", str(exc))
            return False
        if header.version != p.PROTOCOL_VERSION:
            await conn.error(
                header.request_id,
                "version_mismatch",
                f"server speaks kvs protocol version {p.PROTOCOL_VERSION}, client sent {header.version}",
            )
            return False
        if header.opcode != p.Op.HELLO or header.is_reply:
            await conn.error(header.request_id, "auth", "the first request must be HELLO")
            return False
        try:
            hello: p.ClientHello = await conn.read_meta(header)
        except ProtocolError as exc:
            await conn.error(header.request_id, "protocol", str(exc))
            return False
        if hello.version != p.PROTOCOL_VERSION:
            await conn.error(header.request_id, "version_mismatch", f"client version {hello.version}")
            return False
        proof = b""
        if self.token is not None:
            expected = p.auth_proof(self.token, nonce, hello.nonce, server=False)
            if not hello.proof or not hmac.compare_digest(expected, hello.proof):
                log.warning("connection %s: authentication failed", conn.peer)
                await conn.error(header.request_id, "auth", "missing or wrong token")
                return False
            proof = p.auth_proof(self.token, hello.nonce, nonce, server=True)
        if hello.transport not in self.transports:
            await conn.error(header.request_id, "unsupported", f"transport {hello.transport!r} not offered")
            return False
        conn.transport_name = hello.transport
        await conn.reply(p.Op.HELLO, header.request_id, p.HelloReply(proof=proof))
        return True

    async def _request_loop(self, conn: ServerConnection) -> None:
        while not self._closing:
            conn.busy = False
            try:
                header = await conn.read_header()
            except ProtocolError as exc:
                # Desynchronised: say why if we can, then drop the connection.
                with contextlib.suppress(Exception):
                    await conn.error(0, "protocol", str(exc))
                return
            conn.busy = True
            if header.is_reply:
                await conn.error(header.request_id, "protocol", "a reply frame sent to the server")
                return
            handler = self._handlers.get(header.opcode)
            self.counters["requests"] += 1
            _request_counter(header.opcode).inc()
            if handler is None:
                # A well-framed request for an opcode this server does not offer (an extension that is
                # not loaded): its lengths are valid, so skip it and stay in sync.
                await conn.recv_exact(memoryview(bytearray(header.meta_len)))
                await conn.skip_payload()
                await conn.error(header.request_id, "unsupported", f"opcode 0x{header.opcode:02x}")
                continue
            try:
                meta = await conn.read_meta(header)
            except ProtocolError as exc:
                await conn.error(header.request_id, "protocol", str(exc))
                return
            try:
                await handler(conn, header, meta)
            except ProtocolError as exc:
                with contextlib.suppress(Exception):
                    await conn.error(header.request_id, "protocol", str(exc))
                return
            except KVStrataError as exc:
                self.counters["errors"] += 1
                await conn.skip_payload()
                await conn.error(header.request_id, p.error_code(exc), str(exc))
            if conn.payload_left:
                # A handler that answered without consuming its payload: stay in sync.
                await conn.skip_payload()


_REQUEST_COUNTERS: dict[int, Any] = {}


def _request_counter(opcode: int) -> Any:
    """The requests counter of ``opcode`` (looked up once: ``labels()`` costs microseconds a request)."""
    counter = _REQUEST_COUNTERS.get(opcode)
    if counter is None:
        counter = _REQUEST_COUNTERS[opcode] = _REQUESTS.labels(op=_op_name(opcode))
    return counter


def _op_name(opcode: int) -> str:
    try:
        return p.Op(opcode).name
    except ValueError:
        return f"ext_{opcode:02x}"
