"""The shared conformance suite of the :class:`~kvstrata.transport.base.Transport` contract (client side).

Every transport (tcp, shm, nixl) passes this one suite against a real server, and tcp passes it once more
through the fault-injecting proxy of ``tests/transport/faulty_transport.py``. This module is not collected
by itself (its name does not start with ``test_``); a test module subclasses :class:`TransportConformance`
and says which server to test against::

    class TestTcpConformance(TransportConformance):
        @classmethod
        def make_endpoint(cls, tmp: pytest.TempPathFactory) -> Endpoint:
            return LocalEndpoint("kvs", "TcpTransport", start_server=start_tcp_server)

The :class:`Endpoint` is made once per class (its server is shared by the class's tests, so every test uses
fresh random keys), and each test gets a freshly connected transport (the ``transport`` fixture), closed
afterwards. Endpoints:

- :class:`LocalEndpoint`: an in-process server (``tests/transport/servers.py``) on a real socket; its dead
  server test stops a private server of the same kind.
- :class:`ProxiedEndpoint`: the same, but every transport connects through a :class:`FaultyProxy` left in
  pass-through mode: the whole suite must pass through it unchanged.
- :class:`RemoteEndpoint`: the transport lives in a child process (:class:`RemoteTransport` forwards each
  call to it over a socket pair). The nixl transport is tested this way, because a NIXL agent must not live
  in the pytest process (NIXL's teardown at interpreter exit has been seen to crash): the child holds the
  real ``NixlTransport`` and its agent and leaves with ``os._exit``.

What the suite pins down, beyond the docstring of ``kvstrata/transport/base.py``:

- Chunks of 0 and 1 bytes up to the server's slot size round-trip exactly (a size is ``>= 0`` on the wire).
- ``get_many`` into an ``out`` returns a view of that ``out`` (same ``data_ptr``), of the chunk's length,
  whatever the ``out``'s dtype and size; an ``out`` smaller than its chunk raises
  :class:`InvalidArgumentError` and the connection stays usable.
- Empty requests return empty results.
- What one transport puts, a plain tcp connection to the same server reads back, and the other way round.
- After ``close`` (or a connection-level failure) every call raises :class:`ConnectError`,
  :class:`RequestTimeoutError` or :class:`ProtocolError`, never an ``OSError``.
- Chunk bytes travel on the control stream only for tcp (``Endpoint.payload_in_stream``); shm and nixl move
  them out of band (checked by counting what a proxy on the control stream carries).
- In-flight corruption (through a private :class:`FaultyProxy`): a byte flipped in a chunk's payload is a
  miss counted in ``corrupt``, the connection stays in step; any one byte of a get's reply flipped is an
  exact hit, a miss, or a connection-level error, never other bytes returned as a hit. A flipped header
  length field (``meta_len``, ``payload_len``: no checksum covers the header) may leave the client waiting
  for bytes that never come: a RequestTimeoutError at the call's deadline, allowed there only.
"""

from __future__ import annotations

import builtins
import os
import socket
import subprocess
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstrata import errors
from kvstrata.core.buffers import flat_bytes
from kvstrata.core.chunk import EMPTY_META, PrefixResult
from kvstrata.errors import (
    ChunkTooLargeError,
    ConnectError,
    InvalidArgumentError,
    KVStrataError,
    ProtocolError,
    RequestTimeoutError,
)
from kvstrata.transport.base import (
    PutSpec,
    ServerAddress,
    Transport,
    TransportOptions,
    parse_url,
    transport_class,
)
from kvstrata.transport.tcp import TcpTransport
from tests.conftest import free_port
from tests.transport.faulty_transport import FaultyProxy

__all__ = [
    "TIMEOUT",
    "TRANSPORT_FAILURES",
    "Endpoint",
    "LocalEndpoint",
    "ProxiedEndpoint",
    "RemoteEndpoint",
    "RemoteTransport",
    "TransportConformance",
    "new_key",
    "put",
    "random_chunk",
    "same_bytes",
]

ROOT = Path(__file__).resolve().parents[2]
#: Seconds each call of the suite may take (calls that must fail fast are held to less).
TIMEOUT = 5.0
#: What a connection-level failure may raise.
TRANSPORT_FAILURES = (ConnectError, RequestTimeoutError, ProtocolError)


def new_key() -> bytes:
    """A fresh random 16-byte key (servers are shared by a class's tests)."""
    return os.urandom(16)


def random_chunk(nbytes: int) -> torch.Tensor:
    """``nbytes`` random bytes as a flat uint8 tensor."""
    return torch.frombuffer(bytearray(os.urandom(nbytes)), dtype=torch.uint8) if nbytes else empty_chunk()


def empty_chunk() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def same_bytes(got: torch.Tensor | None, want: torch.Tensor) -> bool:
    """Whether ``got`` is a hit holding exactly ``want``'s bytes."""
    if got is None or got.dtype is not torch.uint8 or got.numel() != want.numel():
        return False
    return bool(torch.equal(got.reshape(-1), want.reshape(-1)))


def put(items: Sequence[tuple[bytes, torch.Tensor]]) -> list[PutSpec]:
    """PutSpecs with empty metadata."""
    return [PutSpec(key, data, EMPTY_META) for key, data in items]


def remote_name(transport: Transport) -> str:
    """The class name of the transport doing the work (in the child process for a RemoteTransport)."""
    return str(getattr(transport, "remote_type", type(transport).__name__))


# -- endpoints ---------------------------------------------------------------------------------------


class Endpoint(ABC):
    """A server one conformance class tests one transport against."""

    #: the URL scheme of the transport under test
    scheme: str = "kvs"
    #: the class name of the transport under test
    type_name: str = "TcpTransport"
    #: the largest chunk the server stores (its host tier's slot size)
    slot_bytes: int = 1 << 20
    #: a proxy between the transport and the server (faults can be armed on it), or None
    proxy: FaultyProxy | None = None
    #: whether chunk bytes travel on the transport's TCP stream (tcp; not shm or nixl)
    payload_in_stream: bool = False
    options: TransportOptions = TransportOptions()

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL the transport under test connects to."""

    @property
    @abstractmethod
    def tcp_url(self) -> str:
        """A plain ``kvs://`` URL of the same server (no proxy)."""

    def make(self, url: str | None = None) -> Transport:
        """A new, unconnected transport of the kind under test."""
        address = parse_url(url or self.url)
        return transport_class(address.scheme)(address, self.options)

    def connect(self, url: str | None = None, timeout: float = TIMEOUT) -> Transport:
        """A new transport, connected (HELLO done)."""
        transport = self.make(url)
        try:
            transport.connect(timeout)
        except BaseException:
            transport.close()
            raise
        return transport

    @abstractmethod
    def dead_transports(self, count: int) -> AbstractContextManager[list[Transport]]:
        """``count`` transports that connected to a server which has died since (context manager)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop what the endpoint started."""


class LocalEndpoint(Endpoint):
    """An in-process server (``start_server()`` returns one, started, with ``.port`` and ``.stop()``)."""

    def __init__(
        self,
        scheme: str,
        type_name: str,
        start_server: Callable[[], Any],
        *,
        slot_bytes: int = 1 << 20,
        payload_in_stream: bool = False,
    ) -> None:
        self.scheme = scheme
        self.type_name = type_name
        self.slot_bytes = slot_bytes
        self.payload_in_stream = payload_in_stream
        self._start_server = start_server
        self.server = start_server()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.port}"

    @property
    def tcp_url(self) -> str:
        return f"kvs://127.0.0.1:{self.server.port}"

    @contextmanager
    def dead_transports(self, count: int) -> Iterator[list[Transport]]:
        server = self._start_server()
        transports: list[Transport] = []
        try:
            for _ in range(count):
                transports.append(self.connect(f"{self.scheme}://127.0.0.1:{server.port}"))
            server.stop()
            yield transports
        finally:
            for transport in transports:
                transport.close()
            server.stop()

    def close(self) -> None:
        self.server.stop()


class ProxiedEndpoint(LocalEndpoint):
    """A :class:`LocalEndpoint` whose transports connect through a :class:`FaultyProxy` (pass-through)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy = FaultyProxy(self.server.port)

    @property
    def url(self) -> str:
        assert self.proxy is not None
        return self.proxy.url(self.scheme)

    @contextmanager
    def dead_transports(self, count: int) -> Iterator[list[Transport]]:
        with killed_proxy(self, self.server.port, count) as transports:
            yield transports

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        super().close()


@contextmanager
def killed_proxy(endpoint: Endpoint, port: int, count: int) -> Iterator[list[Transport]]:
    """``count`` transports connected through a private proxy to ``port``, which is then killed: to the
    transports the server is gone (every connection ends, new ones are refused)."""
    transports: list[Transport] = []
    with FaultyProxy(port) as proxy:
        try:
            for _ in range(count):
                transports.append(endpoint.connect(proxy.url(endpoint.scheme)))
            proxy.kill()
            yield transports
        finally:
            for transport in transports:
                transport.close()


# -- a transport in a child process -------------------------------------------------------------------


def _encode_error(exc: BaseException) -> tuple[str, str, str, str]:
    return (type(exc).__module__, type(exc).__qualname__, str(exc), str(getattr(exc, "code", "")))


def _decode_error(info: Sequence[str]) -> BaseException:
    module, name, message, code = info
    if module == errors.__name__:
        cls = getattr(errors, name, None)
        if cls is errors.RemoteError:
            return errors.RemoteError(message, code or "error")
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls(message)
    if module == "builtins":
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)  # an OSError stays an OSError: the suite must see it
    return RuntimeError(f"{module}.{name} in the child: {message}")


def _child_main(fd: int) -> None:
    """The child: serves transport calls from the parent until told to exit, then ``os._exit``."""
    sock = socket.socket(fileno=fd)
    conn = Connection(sock.detach())
    transports: dict[int, Transport] = {}
    code = 0
    try:
        while True:
            request = conn.recv()
            op, handle, args = request
            if op == "exit":
                break
            result: Any = None
            transport = transports.get(handle)
            try:
                if op == "make":
                    url, options = args
                    address = parse_url(url)
                    made = transport_class(address.scheme)(address, options)
                    transports[handle] = transport = made
                    result = type(made).__name__
                else:
                    assert transport is not None
                    result = _child_call(transport, op, args)
                reply: tuple[Any, ...] = ("ok", result)
            except BaseException as exc:
                reply = ("err", _encode_error(exc), traceback.format_exc())
            state = (
                (transport.broken, transport.corrupt, transport.max_payload) if transport else (True, 0, 0)
            )
            conn.send((*reply, state))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown (NIXL's has been seen to crash)


def _child_call(transport: Transport, op: str, args: tuple[Any, ...]) -> Any:
    if op == "put_many":
        items, timeout = args
        specs = [
            PutSpec(
                key, torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else empty_chunk(), meta
            )
            for key, data, meta in items
        ]
        return [None if err is None else _encode_error(err) for err in transport.put_many(specs, timeout)]
    if op == "get_many":
        keys, outs, timeout = args
        local = [None if o is None else torch.empty(o[0], dtype=getattr(torch, o[1])) for o in outs]
        got = transport.get_many(keys, local, timeout)
        shipped: list[tuple[bytes, int] | None] = []
        for result, out in zip(got, local, strict=True):
            if result is None:
                shipped.append(None)
                continue
            offset = -1
            if out is not None and out.numel():
                base = flat_bytes(out)
                start = result.data_ptr() - base.data_ptr()
                if start >= 0 and start + result.numel() <= base.numel():
                    offset = start
            shipped.append((flat_bytes(result.contiguous()).numpy().tobytes(), offset))
        return shipped
    if op == "lookup_prefix":
        keys, timeout = args
        found = transport.lookup_prefix(keys, timeout)
        return (found.num_chunks, found.tiers)
    if op in ("exists", "delete", "stats", "ping", "connect"):
        return getattr(transport, op)(*args)
    if op == "close":
        transport.close()
        return None
    raise ValueError(f"unknown op {op!r}")


class TransportWorker:
    """A child process holding real transports; the parent drives them through :class:`RemoteTransport`."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        parent, child = socket.socketpair()
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.transport.conformance_transport", str(child.fileno())],
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=[child.fileno()],
            )
        child.close()
        self._conn = Connection(parent.detach())
        self._next = 1

    def new_handle(self) -> int:
        handle, self._next = self._next, self._next + 1
        return handle

    def call(self, op: str, handle: int, args: tuple[Any, ...], wait: float) -> tuple[Any, Any]:
        """Run one call in the child; returns ``(result, state)`` or raises what the child raised."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the transport worker exited ({self.proc.returncode}):\n{self.output()}")
        self._conn.send((op, handle, args))
        if not self._conn.poll(wait):
            self.proc.kill()
            raise RuntimeError(f"the transport worker did not answer {op} in {wait} s:\n{self.output()}")
        reply = self._conn.recv()
        if reply[0] == "err":
            _, info, tb, state = reply
            exc = _decode_error(info)
            exc.__notes__ = [f"raised in the transport worker:\n{tb}"]  # shown by pytest
            exc.remote_state = state  # type: ignore[attr-defined]
            raise exc
        return reply[1], reply[2]

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._conn.send(("exit", 0, ()))
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._conn.close()


class RemoteTransport(Transport):
    """A :class:`Transport` whose work is done by a real transport in a :class:`TransportWorker`.

    Tensors cross as bytes; a chunk the child read into its copy of an ``out`` is copied into the parent's
    ``out`` and returned as a view of it, so the ``out`` rules of the contract can be checked here.
    ``broken``, ``corrupt`` and ``max_payload`` are the child transport's, as of the last call.
    """

    def __init__(self, worker: TransportWorker, address: ServerAddress, options: TransportOptions) -> None:
        super().__init__(address, options)
        self.worker = worker
        self.handle = worker.new_handle()
        self._broken = True
        self._max_payload = 0
        self.remote_type = str(self._run("make", (address.url, options), TIMEOUT))

    def _run(self, op: str, args: tuple[Any, ...], timeout: float) -> Any:
        try:
            result, state = self.worker.call(op, self.handle, args, wait=timeout + 30.0)
        except Exception as exc:
            state = getattr(exc, "remote_state", None)
            if state is not None:  # what the child's transport was left as by the failed call
                self._broken, self.corrupt, self._max_payload = state
            raise
        self._broken, self.corrupt, self._max_payload = state
        return result

    @property
    def broken(self) -> bool:
        return self._broken

    @property
    def max_payload(self) -> int:
        return self._max_payload

    def connect(self, timeout: float) -> None:
        self._run("connect", (timeout,), timeout)

    def put_many(self, items: Sequence[PutSpec], timeout: float) -> list[KVStrataError | None]:
        shipped = [(i.key, flat_bytes(i.data.contiguous()).numpy().tobytes(), i.meta) for i in items]
        results = self._run("put_many", (shipped, timeout), timeout)
        out: list[KVStrataError | None] = []
        for info in results:
            if info is None:
                out.append(None)
                continue
            err = _decode_error(info)
            assert isinstance(err, KVStrataError), f"put_many returned a non-kvstrata error: {err!r}"
            out.append(err)
        return out

    def get_many(
        self, keys: Sequence[bytes], outs: Sequence[torch.Tensor | None], timeout: float
    ) -> list[torch.Tensor | None]:
        specs = [None if o is None else (tuple(o.shape), str(o.dtype).removeprefix("torch.")) for o in outs]
        shipped = self._run("get_many", (list(keys), specs, timeout), timeout)
        results: list[torch.Tensor | None] = []
        for item, out in zip(shipped, outs, strict=True):
            if item is None:
                results.append(None)
                continue
            data, offset = item
            got = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else empty_chunk()
            if out is not None and offset >= 0:
                dest = flat_bytes(out)[offset : offset + got.numel()]
                dest.copy_(got)
                got = dest
            results.append(got)
        return results

    def exists(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        return list(self._run("exists", (list(keys), timeout), timeout))

    def lookup_prefix(self, keys: Sequence[bytes], timeout: float) -> PrefixResult:
        count, tiers = self._run("lookup_prefix", (list(keys), timeout), timeout)
        return PrefixResult(count, tuple(tiers))

    def delete(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        return list(self._run("delete", (list(keys), timeout), timeout))

    def stats(self, timeout: float) -> dict[str, Any]:
        return dict(self._run("stats", (timeout,), timeout))

    def ping(self, timeout: float) -> float:
        return float(self._run("ping", (timeout,), timeout))

    def close(self) -> None:
        if self.worker.proc.poll() is None:
            self._run("close", (), TIMEOUT)
        self._broken = True


class RemoteEndpoint(Endpoint):
    """A server on ``port``, tested through transports living in a :class:`TransportWorker`."""

    def __init__(
        self,
        scheme: str,
        type_name: str,
        port: int,
        worker: TransportWorker,
        *,
        slot_bytes: int = 1 << 20,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.scheme = scheme
        self.type_name = type_name
        self.port = port
        self.worker = worker
        self.slot_bytes = slot_bytes
        self._on_close = on_close

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def tcp_url(self) -> str:
        return f"kvs://127.0.0.1:{self.port}"

    def make(self, url: str | None = None) -> Transport:
        return RemoteTransport(self.worker, parse_url(url or self.url), self.options)

    @contextmanager
    def dead_transports(self, count: int) -> Iterator[list[Transport]]:
        with killed_proxy(self, self.port, count) as transports:
            yield transports

    def close(self) -> None:
        try:
            self.worker.close()
        finally:
            if self._on_close is not None:
                self._on_close()


# -- the suite ---------------------------------------------------------------------------------------


def _ops(key: bytes) -> list[tuple[str, Callable[[Transport], Any]]]:
    """One call of each kind, with a short timeout."""
    data = random_chunk(4096)
    return [
        ("ping", lambda t: t.ping(1.0)),
        ("get_many", lambda t: t.get_many([key], [None], 1.0)),
        ("put_many", lambda t: t.put_many(put([(key, data)]), 1.0)),
        ("exists", lambda t: t.exists([key], 1.0)),
        ("lookup_prefix", lambda t: t.lookup_prefix([key], 1.0)),
        ("delete", lambda t: t.delete([key], 1.0)),
        ("stats", lambda t: t.stats(1.0)),
    ]


def assert_fails_as_a_transport_error(call: Callable[[], Any], what: str, within: float) -> BaseException:
    """``call()`` raises one of :data:`TRANSPORT_FAILURES` (never an ``OSError``) within ``within`` s."""
    start = time.monotonic()
    try:
        call()
    except TRANSPORT_FAILURES as exc:
        elapsed = time.monotonic() - start
        assert elapsed < within, f"{what}: failed after {elapsed:.2f} s, more than {within} s"
        return exc
    except OSError as exc:  # pragma: no cover - the failure this guards against
        pytest.fail(f"{what}: an OSError escaped the transport: {exc!r}")
    pytest.fail(f"{what}: no error")


class TransportConformance:
    """The tests every :class:`Transport` passes. Subclasses implement :meth:`make_endpoint`."""

    #: chunk sizes of the round-trip test; "slot" is the server's slot size (the largest chunk)
    SIZES: tuple[int | str, ...] = (0, 1, 4099, 65536, 300_001, "slot")

    @classmethod
    def make_endpoint(cls, tmp: pytest.TempPathFactory) -> Endpoint:
        """The server to test against, started (once per class)."""
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def endpoint(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
        endpoint = cls.make_endpoint(tmp_path_factory)
        try:
            yield endpoint
        finally:
            endpoint.close()

    @pytest.fixture
    def transport(self, endpoint: Endpoint) -> Iterator[Transport]:
        transport = endpoint.connect()
        try:
            yield transport
        finally:
            transport.close()

    @staticmethod
    def _size(endpoint: Endpoint, size: int | str) -> int:
        return endpoint.slot_bytes if size == "slot" else int(size)

    # -- connect -----------------------------------------------------------------------------------
    def test_connect_runs_the_hello_handshake(self, endpoint: Endpoint) -> None:
        transport = endpoint.make()
        try:
            transport.connect(TIMEOUT)
            assert remote_name(transport) == endpoint.type_name
            assert not transport.broken
            assert transport.max_payload >= endpoint.slot_bytes > 0
            assert 0 < transport.ping(TIMEOUT) < TIMEOUT  # the server answers only after HELLO
            assert not transport.broken
        finally:
            transport.close()

    def test_connect_to_a_port_nobody_listens_on_is_a_connect_error(self, endpoint: Endpoint) -> None:
        transport = endpoint.make(f"{endpoint.scheme}://127.0.0.1:{free_port()}")
        try:
            assert_fails_as_a_transport_error(lambda: transport.connect(2.0), "connect", within=3.0)
            assert transport.broken
        finally:
            transport.close()

    # -- puts and gets -----------------------------------------------------------------------------
    @pytest.mark.parametrize("size", SIZES)
    def test_put_then_get_round_trips_the_bytes_exactly(
        self, endpoint: Endpoint, transport: Transport, size: int | str
    ) -> None:
        nbytes = self._size(endpoint, size)
        key, data = new_key(), random_chunk(nbytes)
        assert transport.put_many(put([(key, data)]), TIMEOUT) == [None]
        (got,) = transport.get_many([key], [None], TIMEOUT)
        assert got is not None, f"a {nbytes}-byte chunk just stored is a miss"
        assert got.dtype is torch.uint8 and got.dim() == 1
        assert same_bytes(got, data)
        # into an out larger than the chunk: a view of that out, of the chunk's length
        out = torch.full((nbytes + 7,), 0xEE, dtype=torch.uint8)
        (into,) = transport.get_many([key], [out], TIMEOUT)
        assert into is not None and same_bytes(into, data)
        if nbytes:
            assert into.data_ptr() == out.data_ptr(), "not read into the given out"
        assert not transport.broken

    def test_a_batch_of_mixed_sizes_outs_and_misses(self, endpoint: Endpoint, transport: Transport) -> None:
        sizes = [1, 70_000, 4096, endpoint.slot_bytes, 513, 0, 250_000]
        keys = [new_key() for _ in sizes]
        datas = [random_chunk(n) for n in sizes]
        assert transport.put_many(put(list(zip(keys, datas, strict=True))), TIMEOUT) == [None] * len(sizes)
        missing = new_key()
        order = [0, 1, 2, 7, 3, 4, 5, 6]  # 7: the missing key, in the middle
        ask = [keys[i] if i < len(keys) else missing for i in order]
        want = [datas[i] if i < len(datas) else None for i in order]
        outs: list[torch.Tensor | None] = [
            torch.zeros(sizes[0] + 3, dtype=torch.uint8),
            torch.zeros((sizes[1] // 4 + 8, 1), dtype=torch.float32),  # its bytes are used, whatever dtype
            None,
            torch.zeros(100, dtype=torch.uint8),  # for the missing key
            torch.zeros(sizes[3], dtype=torch.uint8),  # exactly the chunk's size
            None,
            torch.zeros(8, dtype=torch.uint8),  # for the empty chunk
            None,
        ]
        got = transport.get_many(ask, outs, TIMEOUT)
        assert len(got) == len(ask)
        for pos, (g, w, out) in enumerate(zip(got, want, outs, strict=True)):
            if w is None:
                assert g is None, f"position {pos}: a missing key is a hit"
                continue
            assert same_bytes(g, w), f"position {pos}: wrong bytes"
            assert g is not None
            if out is not None and w.numel():
                assert g.data_ptr() == out.data_ptr(), f"position {pos}: not read into its out"
        assert not transport.broken

    def test_many_small_chunks_in_one_batch(self, transport: Transport) -> None:
        keys = [new_key() for _ in range(300)]
        datas = [random_chunk(1000 + 7 * i) for i in range(300)]
        assert transport.put_many(put(list(zip(keys, datas, strict=True))), TIMEOUT) == [None] * 300
        got = transport.get_many(keys, [None] * 300, TIMEOUT)
        assert all(same_bytes(g, d) for g, d in zip(got, datas, strict=True))
        assert transport.exists(keys, TIMEOUT) == [True] * 300

    def test_an_out_smaller_than_its_chunk_is_an_invalid_argument(self, transport: Transport) -> None:
        key, data = new_key(), random_chunk(10_000)
        other, other_data = new_key(), random_chunk(2000)
        transport.put_many(put([(key, data), (other, other_data)]), TIMEOUT)
        with pytest.raises(InvalidArgumentError):
            transport.get_many([key], [torch.empty(100, dtype=torch.uint8)], TIMEOUT)
        assert not transport.broken, "a caller's bad argument does not break the connection"
        got = transport.get_many([key, other], [None, None], TIMEOUT)
        assert same_bytes(got[0], data) and same_bytes(got[1], other_data)

    def test_empty_requests_have_empty_results(self, transport: Transport) -> None:
        assert transport.put_many([], TIMEOUT) == []
        assert transport.get_many([], [], TIMEOUT) == []
        assert transport.exists([], TIMEOUT) == []
        assert transport.delete([], TIMEOUT) == []
        assert transport.lookup_prefix([], TIMEOUT).num_chunks == 0
        assert not transport.broken

    # -- misses, exists, prefixes, deletes ---------------------------------------------------------
    def test_a_miss_is_none_never_an_exception(self, transport: Transport) -> None:
        keys = [new_key() for _ in range(3)]
        outs = [None, torch.empty(4096, dtype=torch.uint8), None]
        assert transport.get_many(keys, outs, TIMEOUT) == [None, None, None]
        assert not transport.broken
        assert transport.exists(keys, TIMEOUT) == [False, False, False]

    def test_exists_per_key(self, transport: Transport) -> None:
        a, b, gone = new_key(), new_key(), new_key()
        transport.put_many(put([(a, random_chunk(100)), (b, random_chunk(5000))]), TIMEOUT)
        assert transport.exists([a, gone, b, a], TIMEOUT) == [True, False, True, True]

    def test_lookup_prefix_counts_leading_keys_and_stops_at_the_first_gap(self, transport: Transport) -> None:
        keys = [new_key() for _ in range(6)]
        held = [0, 1, 2, 4, 5]  # 3 is the gap
        transport.put_many(put([(keys[i], random_chunk(2048)) for i in held]), TIMEOUT)
        found = transport.lookup_prefix(keys, TIMEOUT)
        assert found.num_chunks == 3, "counts the leading present keys only"
        assert len(found.tiers) == 3 and all(isinstance(t, str) and t for t in found.tiers)
        assert transport.lookup_prefix(keys[:2], TIMEOUT).num_chunks == 2
        assert transport.lookup_prefix([keys[3], *keys[:3]], TIMEOUT).num_chunks == 0
        assert transport.lookup_prefix(keys[4:], TIMEOUT).num_chunks == 2

    def test_delete_reports_presence_then_get_is_a_miss(self, transport: Transport) -> None:
        key, keep, never = new_key(), new_key(), new_key()
        keep_data = random_chunk(3000)
        transport.put_many(put([(key, random_chunk(3000)), (keep, keep_data)]), TIMEOUT)
        assert transport.delete([key, never], TIMEOUT) == [True, False]
        assert transport.get_many([key, keep], [None, None], TIMEOUT)[0] is None
        assert transport.exists([key, keep], TIMEOUT) == [False, True]
        assert transport.delete([key], TIMEOUT) == [False]
        (still,) = transport.get_many([keep], [None], TIMEOUT)
        assert same_bytes(still, keep_data)

    def test_writes_are_seen_by_a_plain_tcp_connection_and_back(
        self, endpoint: Endpoint, transport: Transport
    ) -> None:
        mine, theirs = new_key(), new_key()
        mine_data, theirs_data = random_chunk(200_000), random_chunk(123_457)
        transport.put_many(put([(mine, mine_data)]), TIMEOUT)
        plain = TcpTransport(parse_url(endpoint.tcp_url), endpoint.options)
        plain.connect(TIMEOUT)
        try:
            (got,) = plain.get_many([mine], [None], TIMEOUT)
            assert same_bytes(got, mine_data)
            assert plain.put_many(put([(theirs, theirs_data)]), TIMEOUT) == [None]
        finally:
            plain.close()
        (back,) = transport.get_many([theirs], [None], TIMEOUT)
        assert same_bytes(back, theirs_data)

    def test_chunk_bytes_travel_where_the_transport_says(self, endpoint: Endpoint) -> None:
        """On the stream (tcp), or out of band (shm, nixl): counted by a proxy on the control stream."""
        key, data = new_key(), random_chunk(endpoint.slot_bytes)
        with FaultyProxy(parse_url(endpoint.tcp_url).port) as proxy:
            transport = endpoint.connect(proxy.url(endpoint.scheme))
            try:
                up, down = proxy.bytes_up, proxy.bytes_down
                assert transport.put_many(put([(key, data)]), TIMEOUT) == [None]
                (got,) = transport.get_many([key], [None], TIMEOUT)
                assert same_bytes(got, data)
                up, down = proxy.bytes_up - up, proxy.bytes_down - down
            finally:
                transport.close()
        if endpoint.payload_in_stream:
            assert up >= data.numel() and down >= data.numel(), (up, down)
        else:
            assert up < 64 * 1024 and down < 64 * 1024, f"chunk bytes on the control stream: {(up, down)}"

    # -- stats, ping, limits -----------------------------------------------------------------------
    def test_stats_has_tiers_and_server(self, transport: Transport) -> None:
        before = transport.stats(TIMEOUT)
        assert set(before) >= {"tiers", "server"}
        assert isinstance(before["server"], dict) and before["server"]
        tiers = before["tiers"]
        assert isinstance(tiers, dict) and "host" in tiers
        assert all(isinstance(counters, dict) for counters in tiers.values())
        transport.put_many(put([(new_key(), random_chunk(1000))]), TIMEOUT)
        after = transport.stats(TIMEOUT)
        assert after["tiers"]["host"]["puts"] >= before["tiers"]["host"]["puts"] + 1

    def test_ping_is_a_positive_round_trip_time(self, transport: Transport) -> None:
        rtts = [transport.ping(TIMEOUT) for _ in range(3)]
        assert all(isinstance(r, float) and 0 < r < TIMEOUT for r in rtts)

    def test_max_payload_is_positive(self, endpoint: Endpoint, transport: Transport) -> None:
        assert isinstance(transport.max_payload, int)
        assert transport.max_payload >= endpoint.slot_bytes > 0

    def test_a_chunk_larger_than_the_slot_fails_alone(self, endpoint: Endpoint, transport: Transport) -> None:
        small, big, after = new_key(), new_key(), new_key()
        small_data, after_data = random_chunk(5000), random_chunk(70_000)
        results = transport.put_many(
            put([(small, small_data), (big, random_chunk(endpoint.slot_bytes + 1)), (after, after_data)]),
            TIMEOUT,
        )
        assert len(results) == 3 and results[0] is None and results[2] is None
        assert isinstance(results[1], ChunkTooLargeError), f"expected an error object, got {results[1]!r}"
        assert not transport.broken, "a per-item failure leaves the connection usable"
        got = transport.get_many([small, big, after], [None, None, None], TIMEOUT)
        assert same_bytes(got[0], small_data) and got[1] is None and same_bytes(got[2], after_data)
        assert transport.exists([small, big, after], TIMEOUT) == [True, False, True]

    # -- closing and failures ----------------------------------------------------------------------
    def test_close_is_idempotent_and_leaves_it_broken(self, endpoint: Endpoint) -> None:
        transport = endpoint.connect()
        transport.put_many(put([(new_key(), random_chunk(100))]), TIMEOUT)
        transport.close()
        assert transport.broken
        transport.close()
        assert transport.broken
        for name, op in _ops(new_key()):
            assert_fails_as_a_transport_error(partial(op, transport), f"{name} after close", within=2.0)
            assert transport.broken

    def test_a_dead_server_raises_typed_errors_and_breaks_the_transport(self, endpoint: Endpoint) -> None:
        ops = _ops(new_key())
        with endpoint.dead_transports(len(ops)) as transports:
            for (name, op), transport in zip(ops, transports, strict=True):
                assert_fails_as_a_transport_error(partial(op, transport), name, within=3.0)
                assert transport.broken, f"{name}: not broken after a connection-level failure"
                # and it stays so: the caller discards it
                assert_fails_as_a_transport_error(partial(transport.ping, 1.0), "ping after", within=2.0)
                assert transport.broken

    def test_bytes_corrupted_in_flight_are_a_miss_never_wrong_bytes(
        self, endpoint: Endpoint, transport: Transport
    ) -> None:
        if not endpoint.payload_in_stream:
            pytest.skip(
                f"{endpoint.type_name} moves chunk bytes out of band, without a checksum (docs/protocol.md): "
                "no chunk bytes in flight on its stream"
            )
        with ExitStack() as stack:
            proxy = endpoint.proxy
            if proxy is None:  # a private proxy in front of the same server
                proxy = stack.enter_context(FaultyProxy(parse_url(endpoint.tcp_url).port))
                transport = endpoint.connect(proxy.url(endpoint.scheme))
                stack.callback(transport.close)
            stack.callback(proxy.pass_through)
            key, data = new_key(), random_chunk(65_536)
            transport.put_many(put([(key, data)]), TIMEOUT)
            before = transport.corrupt
            proxy.flip_byte(20_000)  # well inside the payload of the next reply
            (got,) = transport.get_many([key], [None], TIMEOUT)
            assert proxy.fired("flip@20000")
            assert got is None, "corrupt bytes were returned as a hit"
            assert transport.corrupt == before + 1, "a checksum miss is counted in corrupt"
            assert not transport.broken, "a checksum miss leaves the connection in step"
            assert transport.exists([key], TIMEOUT) == [True]
            proxy.pass_through()
            again = endpoint.connect(proxy.url(endpoint.scheme))
            try:
                (clean,) = again.get_many([key], [None], TIMEOUT)
                assert same_bytes(clean, data), "the stored chunk itself is intact"
            finally:
                again.close()

    #: the bytes of the first reply to a get that the sweep below flips, one a connection
    SWEEP_BYTES = 96

    def test_a_flipped_byte_in_a_get_reply_never_yields_wrong_bytes(self, endpoint: Endpoint) -> None:
        """Each of the first bytes the server sends in answer to a one-key get, flipped in turn (a new
        connection through a private proxy each time): the chunk comes back exact, as a miss, or the call
        fails with a connection-level error that breaks the transport. A RequestTimeoutError is allowed
        only for the header's length fields (no checksum covers the header: a length made larger than what
        follows leaves the client waiting for bytes that never come)."""
        key, data = new_key(), random_chunk(4096)
        plain = TcpTransport(parse_url(endpoint.tcp_url), endpoint.options)
        plain.connect(TIMEOUT)
        try:
            assert plain.put_many(put([(key, data)]), TIMEOUT) == [None]
        finally:
            plain.close()
        outcomes: dict[str, list[int]] = {"hit": [], "miss": [], "failed": [], "timeout": []}
        wrong: list[str] = []
        with FaultyProxy(parse_url(endpoint.tcp_url).port) as proxy:
            for offset in range(self.SWEEP_BYTES):
                transport = endpoint.connect(proxy.url(endpoint.scheme))
                try:
                    proxy.flip_byte(offset)
                    try:
                        (got,) = transport.get_many([key], [None], 0.4)
                    except RequestTimeoutError:
                        assert transport.broken
                        outcomes["timeout"].append(offset)
                    except TRANSPORT_FAILURES:
                        assert transport.broken, f"offset {offset}: a failed call left the transport usable"
                        outcomes["failed"].append(offset)
                    else:
                        if got is None:
                            outcomes["miss"].append(offset)
                        elif same_bytes(got, data):
                            outcomes["hit"].append(offset)
                        else:
                            wrong.append(f"offset {offset}: {got.numel()} wrong bytes returned as a hit")
                    if not proxy.fired(f"flip@{offset}"):
                        break  # past the end of what the server sent
                finally:
                    transport.close()
                    proxy.pass_through()
        assert not wrong, f"{wrong} ({outcomes})"
        assert outcomes["failed"], f"no flip was caught: {outcomes}"
        lengths = set(range(16, 28))  # meta_len (u32 at 16) and payload_len (u64 at 20)
        assert set(outcomes["timeout"]) <= lengths, (
            f"a timeout outside the header's length fields: {outcomes}"
        )


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
