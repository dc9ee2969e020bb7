"""The Transport conformance suite on tcp, shm and nixl, on tcp once more through the fault-injecting proxy
(pass-through: the proxy must be invisible), and the faults the proxy injects: a dropped connection, a
stalled server, a flipped byte.

Servers: tcp and shm run in-process (a real asyncio server on a real socket; shm with its segment in
``/dev/shm``); nixl runs as a real ``kvstrata serve`` process, and its client transports live in a child
process (see :class:`tests.transport.conformance_transport.RemoteTransport`), so that no NIXL agent lives in
the pytest process.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvstrata.errors import ConnectError, ProtocolError, RequestTimeoutError
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.transport import protocol as p
from kvstrata.transport.base import Transport, TransportOptions, parse_url, transport_class
from kvstrata.transport.shm import SHM_DIR
from kvstrata.transport.tcp import TcpTransport
from tests.conftest import require
from tests.transport.conformance_transport import (
    TIMEOUT,
    TRANSPORT_FAILURES,
    Endpoint,
    LocalEndpoint,
    ProxiedEndpoint,
    RemoteEndpoint,
    TransportConformance,
    TransportWorker,
    new_key,
    put,
    random_chunk,
    same_bytes,
)
from tests.transport.faulty_transport import FaultyProxy
from tests.transport.servers import InProcessServer, ServeProcess

pytestmark = pytest.mark.timeout(120)

#: the host tier's slot (the largest chunk) and capacity of every server here
SLOT = 1 << 20
CAPACITY = 32 << 20
NIXL_ENV = {"KVSTRATA_SERVER_TRANSPORTS": "tcp,nixl"}
HAVE_SHM = os.path.isdir(SHM_DIR)


class _Server:
    """An :class:`InProcessServer`, with the ``port`` and ``stop`` the endpoints use."""

    def __init__(self, server: InProcessServer) -> None:
        self.inner = server.start()
        self.port = parse_url(server.url).port

    def stop(self) -> None:
        self.inner.stop()


def start_tcp_server() -> _Server:
    return _Server(InProcessServer(capacity=CAPACITY, slot=SLOT))


def start_shm_server() -> _Server:
    """An in-process server with the shm extension, its host pool in a shared-memory segment."""
    from kvstrata.server.shm import ShmServerExtension

    ext = ShmServerExtension(SimpleNamespace(store=SimpleNamespace(slot_bytes=SLOT)), staging_slots=4)
    buffer = ext.host_buffer(CAPACITY)
    assert buffer is not None, "no room for the host pool in shared memory"
    store = Store([HostTier(CAPACITY, SLOT, buffer=buffer)])
    ext.attach(store)
    return _Server(InProcessServer(store=store, extensions=[ext]))


#: A bug of the lease transports (shm, nixl), found by the suite's byte-flip sweep.


def _have_nixl() -> bool:
    try:
        return importlib.util.find_spec("nixl") is not None
    except (ImportError, ValueError):
        return False


# -- the suite on each transport ---------------------------------------------------------------------


class TestTcpConformance(TransportConformance):
    """kvs:// straight to the server."""

    @classmethod
    def make_endpoint(cls, tmp: pytest.TempPathFactory) -> Endpoint:
        return LocalEndpoint("kvs", "TcpTransport", start_tcp_server, slot_bytes=SLOT, payload_in_stream=True)


@pytest.mark.skipif(not HAVE_SHM, reason="no POSIX shared memory")
class TestShmConformance(TransportConformance):
    """kvs+shm:// to a server whose host pool is in shared memory (gets and puts copy in place)."""

    @classmethod
    def make_endpoint(cls, tmp: pytest.TempPathFactory) -> Endpoint:
        return LocalEndpoint("kvs+shm", "ShmTransport", start_shm_server, slot_bytes=SLOT)


class TestNixlConformance(TransportConformance):
    """kvs+nixl:// to a ``kvstrata serve`` process; the transports (and the NIXL agent) in a child."""

    @classmethod
    def make_endpoint(cls, tmp: pytest.TempPathFactory) -> Endpoint:
        require(_have_nixl(), "nixl")
        where = tmp.mktemp("nixl-conformance")
        server = ServeProcess(where, "--host-cache", "32MiB", "--slot-size", "1MiB", env=NIXL_ENV).start()

        def stop_server() -> None:
            try:
                if server.proc is not None and server.proc.poll() is None:
                    server.terminate(timeout=20)
            finally:
                server.kill()

        try:
            worker = TransportWorker(where / "worker.log", env=NIXL_ENV)
        except BaseException:
            stop_server()
            raise
        return RemoteEndpoint(
            "kvs+nixl", "NixlTransport", server.port, worker, slot_bytes=SLOT, on_close=stop_server
        )


class TestTcpThroughProxyConformance(TransportConformance):
    """kvs:// through the fault-injecting proxy in pass-through mode: it must be invisible."""

    @classmethod
    def make_endpoint(cls, tmp: pytest.TempPathFactory) -> Endpoint:
        return ProxiedEndpoint(
            "kvs", "TcpTransport", start_tcp_server, slot_bytes=SLOT, payload_in_stream=True
        )

    def test_the_traffic_really_goes_through_the_proxy(
        self, endpoint: Endpoint, transport: Transport
    ) -> None:
        proxy = endpoint.proxy
        assert proxy is not None
        accepted, down = proxy.accepted, proxy.bytes_down
        key, data = new_key(), random_chunk(SLOT)
        transport.put_many(put([(key, data)]), TIMEOUT)
        (got,) = transport.get_many([key], [None], TIMEOUT)
        assert same_bytes(got, data)
        assert proxy.accepted == accepted  # the fixture's transport connected before
        assert proxy.bytes_down - down >= SLOT
        assert all(e.startswith("flip@") for e in proxy.events)  # only the corruption test's


# -- faults through the proxy ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[_Server]:
    server = start_tcp_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shm_server() -> Iterator[_Server]:
    if not HAVE_SHM:
        pytest.skip("no POSIX shared memory")
    server = start_shm_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["kvs", "kvs+shm"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server_for(scheme: str, request: pytest.FixtureRequest) -> _Server:
    """The server of the scheme under test (the shm one serves kvs:// too, but tcp gets its own)."""
    server: _Server = request.getfixturevalue("tcp_server" if scheme == "kvs" else "shm_server")
    return server


@pytest.fixture
def proxy(server_for: _Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(server_for.port) as proxy:
        yield proxy


@pytest.fixture
def tcp_proxy(tcp_server: _Server) -> Iterator[FaultyProxy]:
    with FaultyProxy(tcp_server.port) as proxy:
        yield proxy


def _connect(url: str, timeout: float = TIMEOUT) -> Transport:
    address = parse_url(url)
    transport = transport_class(address.scheme)(address, TransportOptions())
    transport.connect(timeout)
    return transport


def _direct(server: _Server) -> TcpTransport:
    transport = TcpTransport(parse_url(f"kvs://127.0.0.1:{server.port}"), TransportOptions())
    transport.connect(TIMEOUT)
    return transport


def _stored(server: _Server, *sizes: int) -> list[tuple[bytes, torch.Tensor]]:
    """Chunks put straight into ``server`` (not through the proxy)."""
    items = [(new_key(), random_chunk(n)) for n in sizes]
    direct = _direct(server)
    try:
        assert direct.put_many(put(items), TIMEOUT) == [None] * len(items)
    finally:
        direct.close()
    return items


def _still_intact(proxy: FaultyProxy, scheme: str, items: list[tuple[bytes, torch.Tensor]]) -> None:
    """A new connection through the (disarmed) proxy reads every chunk back exactly."""
    fresh = _connect(proxy.url(scheme))
    try:
        got = fresh.get_many([k for k, _ in items], [None] * len(items), TIMEOUT)
        assert all(same_bytes(g, d) for g, (_, d) in zip(got, items, strict=True))
    finally:
        fresh.close()


@pytest.mark.parametrize("offset", [0, 10, 40, 5000])
def test_a_connection_dropped_mid_reply_is_a_connect_error(
    scheme: str, server_for: _Server, proxy: FaultyProxy, offset: int
) -> None:
    if scheme != "kvs" and offset > 40:
        pytest.skip("shm replies carry no chunk bytes: nothing to drop that far in")
    items = _stored(server_for, 65_536, 300_000)
    transport = _connect(proxy.url(scheme))
    try:
        proxy.drop_after(offset)
        outs = [torch.zeros(65_536, dtype=torch.uint8), None]
        with pytest.raises(ConnectError):
            transport.get_many([k for k, _ in items], outs, TIMEOUT)
        assert proxy.fired("drop")
        assert transport.broken
        with pytest.raises(TRANSPORT_FAILURES):
            transport.exists([items[0][0]], 1.0)
    finally:
        transport.close()
    _still_intact(proxy, scheme, items)


def test_a_connection_dropped_before_the_put_reply_is_a_connect_error(
    scheme: str, server_for: _Server, proxy: FaultyProxy
) -> None:
    transport = _connect(proxy.url(scheme))
    key, data = new_key(), random_chunk(200_000)
    try:
        proxy.drop_after(0)
        with pytest.raises(ConnectError):
            transport.put_many(put([(key, data)]), TIMEOUT)
        assert proxy.fired("drop") and transport.broken
    finally:
        transport.close()
    # the put may or may not have been stored; what is there is never other bytes
    fresh = _connect(proxy.url(scheme))
    try:
        (got,) = fresh.get_many([key], [None], TIMEOUT)
        assert got is None or same_bytes(got, data)
    finally:
        fresh.close()


_STALL_OPS: dict[str, Callable[[Transport, bytes, float], Any]] = {
    "get_many": lambda t, key, timeout: t.get_many([key], [None], timeout),
    "put_many": lambda t, key, timeout: t.put_many(put([(new_key(), random_chunk(300_000))]), timeout),
    "ping": lambda t, key, timeout: t.ping(timeout),
}


@pytest.mark.parametrize("op", sorted(_STALL_OPS))
def test_a_stalled_server_is_a_request_timeout_within_the_deadline(
    scheme: str, server_for: _Server, proxy: FaultyProxy, op: str
) -> None:
    ((key, _),) = _stored(server_for, 100_000)
    transport = _connect(proxy.url(scheme))
    timeout = 0.25
    try:
        proxy.stall()
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            _STALL_OPS[op](transport, key, timeout)
        elapsed = time.monotonic() - start
        assert timeout * 0.8 <= elapsed < timeout + 0.5, f"{op}: gave up after {elapsed:.3f} s"
        assert transport.broken
    finally:
        transport.close()
        proxy.pass_through()


def test_connecting_to_a_stalled_server_is_a_request_timeout(scheme: str, proxy: FaultyProxy) -> None:
    proxy.stall()
    address = parse_url(proxy.url(scheme))
    transport = transport_class(address.scheme)(address, TransportOptions())
    start = time.monotonic()
    try:
        with pytest.raises(RequestTimeoutError):
            transport.connect(0.25)
        assert time.monotonic() - start < 0.75
        assert transport.broken
    finally:
        transport.close()


def test_a_flipped_payload_byte_is_a_miss_and_the_connection_stays_in_step(
    tcp_server: _Server, tcp_proxy: FaultyProxy
) -> None:
    proxy = tcp_proxy
    items = _stored(tcp_server, 10_000, 20_000, 30_000)
    transport = _connect(proxy.url("kvs"))
    try:
        before = transport.corrupt
        # the reply: header, metadata, then the three chunks; flip a byte inside the second chunk
        meta = p.encode_meta(p.GetManyReply(sizes=[10_000, 20_000, 30_000], checksums=[1, 2, 3]))
        offset = p.HEADER_SIZE + len(meta) + 10_000 + 12_345
        proxy.flip_byte(offset, mask=0x01)
        got = transport.get_many(
            [k for k, _ in items], [None, torch.empty(20_000, dtype=torch.uint8), None], 5
        )
        assert proxy.fired("flip@")
        assert got[1] is None, "a chunk whose bytes were damaged in flight is a miss"
        assert same_bytes(got[0], items[0][1]) and same_bytes(got[2], items[2][1])
        assert transport.corrupt == before + 1
        assert not transport.broken
        again = transport.get_many([k for k, _ in items], [None] * 3, TIMEOUT)
        assert all(same_bytes(g, d) for g, (_, d) in zip(again, items, strict=True))
    finally:
        transport.close()


@pytest.mark.parametrize("mask", [0xFF, 0x01])
def test_a_flipped_byte_anywhere_in_a_reply_never_yields_wrong_bytes(
    tcp_server: _Server, tcp_proxy: FaultyProxy, mask: int
) -> None:
    """Every byte of a GET_MANY reply's header and metadata, and bytes across its payload, flipped in turn
    (a new connection each time): the chunk comes back exact, as a miss (counted in ``corrupt``), or the
    call fails with a ProtocolError that breaks the transport. The one exception is a length field of the
    header (``meta_len``, ``payload_len``: no checksum covers the header) made larger than what follows:
    the client then waits for bytes that never come, and the call ends in a RequestTimeoutError at its
    deadline (a connection-level failure too; never data)."""
    proxy = tcp_proxy
    ((key, data),) = _stored(tcp_server, 4096)
    meta_len = len(p.encode_meta(p.GetManyReply(sizes=[4096], checksums=[0xFFFFFFFF])))
    framing = p.HEADER_SIZE + meta_len
    offsets = [*range(framing + 2), framing + 1000, framing + 4095]
    outcomes: dict[str, list[int]] = {"hit": [], "miss": [], "protocol": [], "timeout": []}
    for offset in offsets:
        transport = _connect(proxy.url("kvs"))
        try:
            proxy.flip_byte(offset, mask)
            try:
                (got,) = transport.get_many([key], [None], 0.5)
            except ProtocolError:
                assert transport.broken, f"offset {offset}: a ProtocolError left the transport usable"
                outcomes["protocol"].append(offset)
            except RequestTimeoutError:
                assert transport.broken
                outcomes["timeout"].append(offset)
            else:
                if got is None:
                    assert transport.corrupt == 1, f"offset {offset}: a miss not counted as corrupt"
                    assert transport.exists([key], TIMEOUT) == [True], f"offset {offset}: out of step"
                    outcomes["miss"].append(offset)
                else:
                    assert same_bytes(got, data), f"offset {offset}: wrong bytes returned as a hit"
                    outcomes["hit"].append(offset)
            assert proxy.fired(f"flip@{offset}"), f"offset {offset}: the flip never happened"
        finally:
            transport.close()
            proxy.pass_through()
    # both defences were exercised: the frame checks and the payload checksums
    assert outcomes["protocol"] and outcomes["miss"], outcomes
    assert {framing + 1000, framing + 4095} <= set(outcomes["miss"]), outcomes
    lengths = set(range(16, 28))  # meta_len (u32 at 16) and payload_len (u64 at 20)
    assert set(outcomes["timeout"]) <= lengths, f"a timeout outside the header's length fields: {outcomes}"


def test_a_killed_proxy_refuses_new_connections(tcp_server: _Server) -> None:
    with FaultyProxy(tcp_server.port) as proxy:
        transport = _connect(proxy.url("kvs"))
        try:
            proxy.kill()
            with pytest.raises(ConnectError):
                transport.ping(1.0)
            assert transport.broken
        finally:
            transport.close()
        with pytest.raises(ConnectError):
            _connect(proxy.url("kvs"), timeout=1.0)
