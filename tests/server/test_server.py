"""The kvs server over real sockets (in-process, fresh Store per test): framing, pipelining, limits,
typed errors, back-pressure, and the admin API."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import msgspec
import pytest
import torch

from kvstrata.client import Client
from kvstrata.errors import ChunkTooLargeError, ConnectError
from kvstrata.transport import protocol as p
from tests.kvstore.conformance_tier import chunk_key
from tests.transport.servers import InProcessServer, wait_until

pytestmark = pytest.mark.timeout(60)


class Raw:
    """A raw protocol peer: frames out, frames in."""

    #: every peer opened by the running test, closed after it (a test that fails midway leaks none)
    opened: list[Raw] = []

    def __init__(self, port: int, hello: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        Raw.opened.append(self)
        self.decoder = p.FrameDecoder(1 << 30, replies=True)
        self.pending: list[p.Frame] = []
        greeting_header = p.parse_header(self.recv_exact(p.HEADER_SIZE), 1 << 30)
        self.greeting = p.decode_meta(
            greeting_header.opcode, True, self.recv_exact(greeting_header.meta_len), kind=p.ServerHello
        )
        if hello:
            self.send(p.Op.HELLO, 1, p.ClientHello(version=p.PROTOCOL_VERSION, nonce=os.urandom(32)))
            assert self.frame().header.opcode == p.Op.HELLO

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def encode(
        self, op: int, rid: int, meta: msgspec.Struct, payload: bytes = b"", crc: int | None = None
    ) -> bytes:
        raw = p.encode_meta(meta)
        flags = p.Flag.CHECKSUM if crc is not None else 0
        return p.pack_header(op, rid, len(raw), len(payload), flags=flags, checksum=crc or 0) + raw + payload

    def send(
        self, op: int, rid: int, meta: msgspec.Struct, payload: bytes = b"", crc: int | None = None
    ) -> None:
        self.sock.sendall(self.encode(op, rid, meta, payload, crc))

    def frame(self) -> p.Frame:
        while not self.pending:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.pending += self.decoder.feed(chunk)
        return self.pending.pop(0)

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def _close_raw_peers() -> Iterator[None]:
    yield
    while Raw.opened:
        Raw.opened.pop().close()


@pytest.fixture
def server() -> Iterator[InProcessServer]:
    with InProcessServer(capacity=8 << 20, slot=256 << 10) as srv:
        yield srv


def port_of(srv: InProcessServer) -> int:
    assert srv.server is not None
    return srv.server.port


def test_greeting_announces_limits(server: InProcessServer) -> None:
    raw = Raw(port_of(server), hello=False)
    assert raw.greeting.version == p.PROTOCOL_VERSION
    assert len(raw.greeting.nonce) == 32 and raw.greeting.auth is False
    assert raw.greeting.max_payload == 256 << 20 and raw.greeting.transports == ["tcp"]
    raw.close()


def test_pipelined_requests_are_answered_in_order(server: InProcessServer) -> None:
    raw = Raw(port_of(server))
    key, missing = chunk_key(1), chunk_key(2)
    payload = os.urandom(5000)
    batch = b"".join(
        [
            raw.encode(p.Op.PING, 10, p.Empty()),
            raw.encode(p.Op.PUT, 11, p.PutRequest(key=key), payload, crc=p.checksum(payload)),
            raw.encode(p.Op.GET, 12, p.KeyRequest(key=key), crc=0),
            raw.encode(p.Op.EXISTS, 13, p.KeysRequest(keys=[key, missing])),
            raw.encode(p.Op.GET, 14, p.KeyRequest(key=missing)),
            raw.encode(p.Op.LOOKUP_PREFIX, 15, p.KeysRequest(keys=[key, missing, key])),
            raw.encode(p.Op.DELETE, 16, p.KeysRequest(keys=[key, missing])),
        ]
    )
    raw.sock.sendall(batch)
    frames = [raw.frame() for _ in range(7)]
    assert [f.header.request_id for f in frames] == list(range(10, 17))
    assert [f.header.opcode for f in frames] == [
        p.Op.PING, p.Op.PUT, p.Op.GET, p.Op.EXISTS, p.Op.GET, p.Op.LOOKUP_PREFIX, p.Op.DELETE,
    ]  # fmt: skip
    assert frames[2].meta.found and frames[2].payload == payload and frames[2].header.has_checksum
    assert frames[3].meta.present == [True, False]
    assert frames[4].meta.found is False and frames[4].payload == b""
    assert frames[5].meta == p.LookupReply(num_chunks=1, tiers=["host"])
    assert frames[6].meta.removed == [True, False]
    raw.close()


def test_corrupt_payload_is_refused_and_the_stream_stays_in_sync(server: InProcessServer) -> None:
    raw = Raw(port_of(server))
    payload = b"x" * 1000
    raw.send(p.Op.PUT, 2, p.PutRequest(key=chunk_key(3)), payload, crc=p.checksum(payload) ^ 1)
    reply = raw.frame()
    assert reply.header.opcode == p.Op.ERROR and reply.meta.code == "corrupt"
    assert not server.store.contains(chunk_key(3))
    raw.send(p.Op.PING, 3, p.Empty())
    assert raw.frame().header.request_id == 3
    raw.close()


def test_unknown_extension_opcode_is_unsupported_but_in_sync(server: InProcessServer) -> None:
    raw = Raw(port_of(server))
    raw.sock.sendall(p.pack_header(0x45, 4, 1, 100) + b"\x80" + b"\0" * 100)
    reply = raw.frame()
    assert reply.header.opcode == p.Op.ERROR and reply.meta.code == "unsupported"
    raw.send(p.Op.PING, 5, p.Empty())
    assert raw.frame().header.request_id == 5
    raw.close()


@pytest.mark.parametrize(
    "bad",
    [
        b"GARBAGE-NOT-A-FRAME-AT-ALL-32BYTES!",
        p.pack_header(p.Op.PUT_MANY, 6, 0, 10) + b"\0" * 10,  # empty metadata: schema mismatch
        p.pack_header(p.Op.PING, 6, 1, flags=p.Flag.REPLY) + b"\x80",  # a reply sent to the server
    ],
)
def test_malformed_frames_get_a_typed_error_then_close(server: InProcessServer, bad: bytes) -> None:
    raw = Raw(port_of(server))
    raw.sock.sendall(bad)
    reply = raw.frame()
    assert reply.header.opcode == p.Op.ERROR and reply.meta.code == "protocol"
    assert raw.closed()
    with Client(server.url) as client:  # everyone else is served
        client.put(chunk_key(7), b"fine")


def test_put_many_sizes_must_add_up(server: InProcessServer) -> None:
    raw = Raw(port_of(server))
    meta = p.PutManyRequest(items=[p.PutItem(key=chunk_key(8), size=10)])
    raw.send(p.Op.PUT_MANY, 7, meta, b"y" * 20)
    reply = raw.frame()
    assert reply.meta.code == "protocol"
    raw.close()


def test_requests_before_hello_are_refused(server: InProcessServer) -> None:
    raw = Raw(port_of(server), hello=False)
    raw.send(p.Op.PING, 8, p.Empty())
    reply = raw.frame()
    assert reply.meta.code == "auth"
    assert raw.closed()


def test_oversized_chunk_is_a_typed_error(server: InProcessServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(ChunkTooLargeError):
            client.put(chunk_key(9), torch.zeros((256 << 10) + 1, dtype=torch.uint8))
        client.put(chunk_key(10), b"still usable")
        assert client.get(chunk_key(10)) is not None


def test_get_many_beyond_the_reply_budget_is_deferred_and_completed() -> None:
    with InProcessServer(capacity=8 << 20, slot=64 << 10, max_inflight_bytes=100 << 10) as srv:
        keys = [chunk_key(i, b"budget") for i in range(6)]
        data = [torch.full((40 << 10,), i, dtype=torch.uint8) for i in range(6)]
        with Client(srv.url) as client:
            client.put_many(keys, data)
            raw = Raw(port_of(srv))
            raw.send(p.Op.GET_MANY, 9, p.KeysRequest(keys=keys))
            sizes = raw.frame().meta.sizes
            assert sizes[:2] == [40 << 10, 40 << 10] and set(sizes[2:]) == {-2}
            got = client.get_many(keys)
            assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data, strict=True))
            raw.close()


def test_reader_that_never_reads_is_disconnected_and_unpins() -> None:
    with InProcessServer(capacity=1 << 20, slot=256 << 10, write_timeout=0.5) as srv:
        keys = [chunk_key(i, b"pins") for i in range(4)]
        with Client(srv.url) as client:
            client.put_many(keys, [torch.zeros(256 << 10, dtype=torch.uint8)] * 4)
            raw = Raw(port_of(srv))
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for i in range(50):
                raw.send(p.Op.GET_MANY, 100 + i, p.KeysRequest(keys=keys))
            assert server_connections(srv) == 2
            # The stalled connection holds pins (every slot) until the write timeout drops it.
            assert wait_until(lambda: server_connections(srv) == 1, timeout=10)
            client.put(chunk_key(99, b"pins"), b"room again")
            raw.close()


def server_connections(srv: InProcessServer) -> int:
    assert srv.server is not None
    return srv.server.counters["connections"]


def test_connection_limit() -> None:
    with InProcessServer(max_connections=1) as srv:
        first = Raw(port_of(srv))
        with pytest.raises(ConnectError):
            Client(srv.url, timeout=2).get(chunk_key(1))
        first.close()
        assert wait_until(lambda: server_connections(srv) == 0)
        with Client(srv.url) as client:
            assert client.get(chunk_key(1)) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_admin_api_in_process(server: InProcessServer) -> None:
    from fastapi.testclient import TestClient

    from kvstrata.server.admin import MAX_LOOKUP_KEYS, create_admin_app

    assert server.server is not None
    with Client(server.url) as client:
        client.put(chunk_key(1), b"a")
    http = TestClient(create_admin_app(server.server))
    assert http.get("/readyz").json()["ready"] is True
    assert http.get("/v1/lookup", params={"keys": chunk_key(1).hex()}).json()["num_chunks"] == 1
    assert http.get("/v1/lookup", params={"keys": "00ff"}).status_code == 400
    too_many = [chunk_key(1).hex()] * (MAX_LOOKUP_KEYS + 1)
    assert http.post("/v1/lookup", json={"keys": too_many}).status_code == 413
    assert http.post("/v1/lookup", content=b"not json").status_code == 400
    stats = http.get("/v1/stats").json()
    assert stats["server"]["connections_total"] >= 1 and stats["tiers"]["host"]["puts"] == 1
    secured = TestClient(create_admin_app(server.server, token=b"t" * 16))
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/v1/stats").status_code == 401
    assert secured.get("/v1/stats", headers={"Authorization": "Bearer " + "t" * 16}).status_code == 200
    assert secured.get("/metrics").status_code == 401


def test_stop_finishes_in_flight_and_refuses_new(server: InProcessServer) -> None:
    with Client(server.url) as client:
        client.put(chunk_key(1), b"a" * 100)
    assert server.server is not None and server.server.ready
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5
    with pytest.raises(ConnectError):
        Client(server.url, timeout=1).get(chunk_key(1))


def test_store_with_a_disk_tier_is_served_off_the_event_loop(tmp_path: object) -> None:
    from kvstrata.kvstore.disk import DiskTier
    from kvstrata.kvstore.host import HostTier
    from kvstrata.kvstore.store import Store

    store = Store([HostTier(4 * (64 << 10), 64 << 10), DiskTier(str(tmp_path), 16 << 20)])
    with InProcessServer(store=store) as srv, Client(srv.url) as client:
        assert srv.server is not None and srv.server._offload
        keys = [chunk_key(i, b"disk") for i in range(12)]
        data = [torch.full((50 << 10,), i, dtype=torch.uint8) for i in range(12)]
        client.put_many(keys, data)  # more than the host tier holds: the coldest go to disk
        store.flush(10)
        found = client.lookup_prefix(keys)
        assert found.num_chunks == 12 and "disk" in found.tiers and "host" in found.tiers
        got = client.get_many(keys)
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data, strict=True))
        one = client.get(keys[0])
        assert one is not None and torch.equal(one, data[0])
