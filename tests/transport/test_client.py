"""The Python client and the tcp transport against real servers (in-process, real sockets): several
servers, outages, timeouts, out buffers, corrupt replies, URLs and the transport registry."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

from kvstrata.client import AsyncClient, Client
from kvstrata.core.keys import ChunkKey
from kvstrata.errors import (
    ConnectError,
    InvalidArgumentError,
    RequestTimeoutError,
)
from kvstrata.server.extension import server_extension_class
from kvstrata.transport import protocol as p
from kvstrata.transport import tcp
from kvstrata.transport.base import (
    DEFAULT_PORT,
    parse_url,
    register_transport,
    transport_class,
)
from kvstrata.transport.tcp import TcpTransport
from tests.kvstore.conformance_tier import chunk_key, pattern
from tests.transport.servers import InProcessServer, wait_until

pytestmark = pytest.mark.timeout(60)


def test_urls_and_registry() -> None:
    assert parse_url("kvs://10.0.0.1:7480").port == 7480
    assert parse_url("127.0.0.1").port == DEFAULT_PORT
    assert parse_url("kvs+shm://host").scheme == "kvs+shm"
    assert parse_url("kvs://[::1]:9").url == "kvs://[::1]:9"
    for bad in ("http://x:1", "kvs://", "kvs://h:1/path", "", "kvs://h:99999"):
        with pytest.raises(InvalidArgumentError):
            parse_url(bad)
    assert transport_class("kvs") is TcpTransport
    assert server_extension_class("tcp") is None
    register_transport("kvs+test", "kvstrata.transport.nonexistent:Nope")
    with pytest.raises(InvalidArgumentError, match="not available"):
        transport_class("kvs+test")
    with pytest.raises(InvalidArgumentError):
        server_extension_class("carrier-pigeon")


def test_get_into_out_buffers_and_meta_of_chunk_keys() -> None:
    with InProcessServer() as srv, Client(srv.url) as client:
        raw = chunk_key(1)
        ck = ChunkKey(raw, (chunk_key(0), raw), 0)
        data = pattern(raw, 3000)
        client.put(ck, data)
        assert srv.store.get_meta(raw).block_keys == (chunk_key(0), raw)
        buf = bytearray(4000)
        got = client.get(raw, out=buf)
        assert got is not None and got.numel() == 3000 and bytes(buf[:3000]) == data.numpy().tobytes()
        with pytest.raises(InvalidArgumentError):
            client.get(raw, out=torch.empty(2999, dtype=torch.uint8))
        assert client.get(raw) is not None, "the connection stays usable after a refused out"
        with pytest.raises(InvalidArgumentError):
            client.put(chunk_key(2), torch.zeros(8, 8).t())
        with pytest.raises(InvalidArgumentError):
            client.get(b"short")
        # A lone key is accepted where a list is: one answer back, not a list.
        assert client.exists(raw) is True and client.exists(ck) is True
        assert client.exists(chunk_key(9)) is False
        assert client.delete(ck) == 1 and client.exists(raw) is False
        assert client.delete(raw) == 0


def test_several_servers_spread_keys_and_skip_a_dead_one() -> None:
    first, second = InProcessServer().start(), InProcessServer().start()
    try:
        client = Client([first.url, second.url], timeout=2, retry_backoff=0.05)
        keys = [chunk_key(i, b"spread") for i in range(40)]
        client.put_many(keys, [pattern(k, 100) for k in keys])
        on_first = [k for k in keys if first.store.contains(k)]
        on_second = [k for k in keys if second.store.contains(k)]
        assert on_first and on_second and len(on_first) + len(on_second) == len(keys)
        assert client.exists(keys) == [True] * len(keys)
        found = client.lookup_prefix(keys)
        assert found.num_chunks == len(keys) and found.tiers == ("host",) * len(keys)
        assert found.servers == tuple(first.url if k in on_first else second.url for k in keys)
        # The prefix ends at the first key no server holds, whichever server owns the keys after it.
        gap = keys.index(on_second[1])
        assert (second.store.remove(keys[gap]), client.lookup_prefix(keys).num_chunks) == (True, gap)
        client.put(keys[gap], pattern(keys[gap], 100))
        assert {s["server"]["connections"] for s in client.stats().values()} == {1}
        # Same placement from another client (rendezvous hashing is stable).
        other = Client([second.url, first.url])
        assert all(g is not None for g in other.get_many(on_first[:3]))
        other.close()
        second.stop()
        got = client.get_many(keys)
        assert all(got[keys.index(k)] is None for k in on_second), "keys of the dead server are misses"
        assert all(torch.equal(got[keys.index(k)], pattern(k, 100)) for k in on_first)  # type: ignore[arg-type]
        client.put(on_second[0], b"rerouted")  # goes to the next server in rendezvous order
        assert first.store.contains(on_second[0])
        client.close()
    finally:
        first.stop()
        second.stop()


def test_a_put_that_finds_a_server_dead_sends_its_chunks_to_the_next_one() -> None:
    first, second = InProcessServer().start(), InProcessServer().start()
    dead_url = second.url
    second.stop()  # dead before this client ever reached it: the put is what finds out
    try:
        client = Client([first.url, dead_url], timeout=2, retry_backoff=5)
        keys = [chunk_key(i, b"failover") for i in range(40)]
        owned_by_dead = [k for k in keys if client._ranked(k)[0].address.url == dead_url]
        assert owned_by_dead, "some keys rank the dead server first"
        client.put_many(keys, [pattern(k, 64) for k in keys])  # no error: the live server took them all
        assert all(first.store.contains(k) for k in keys)
        client.close()
        # A fresh client does not know the owner is dead either: the call that finds out looks for its keys
        # on the next server, where the put placed them.
        fresh = Client([dead_url, first.url], timeout=2, retry_backoff=5)
        got = fresh.get_many(keys)
        assert all(g is not None and torch.equal(g, pattern(k, 64)) for g, k in zip(got, keys, strict=True))
        fresh.close()
        fresh = Client([first.url, dead_url], timeout=2, retry_backoff=5)
        assert fresh.exists(owned_by_dead) == [True] * len(owned_by_dead)
        fresh.close()
        fresh = Client([first.url, dead_url], timeout=2, retry_backoff=5)
        assert fresh.delete(owned_by_dead) == len(owned_by_dead)
        assert not any(first.store.contains(k) for k in owned_by_dead)
        fresh.close()
        with pytest.raises(ConnectError):  # with every server down, a put still fails loudly
            lone = Client([dead_url, "kvs://127.0.0.1:1"], timeout=1, retry_backoff=5)
            lone.put(keys[0], b"nowhere")
        lone.close()
    finally:
        first.stop()


def test_stats_and_ping_report_the_servers_that_do_not_answer() -> None:
    """With several servers, a dead one and a silent one (it greets, then never answers) are reported in
    stats and ping beside the live one's figures; only when none answers do they raise."""
    live = InProcessServer().start()
    dead = InProcessServer().start()
    dead_url = dead.url
    dead.stop()
    silent, _thread = _silent_server(True)
    silent_url = f"kvs://127.0.0.1:{silent.getsockname()[1]}"
    try:
        with Client([live.url, dead_url, silent_url], timeout=0.5, retry_backoff=5) as client:
            live.store.put(chunk_key(1, b"stats"), pattern(chunk_key(1, b"stats"), 100))
            stats = client.stats()
            assert list(stats) == [live.url, dead_url, silent_url]
            assert stats[live.url]["tiers"]["host"]["chunks"] == 1
            assert stats[dead_url]["error"]["type"] == "ConnectError"
            assert stats[silent_url]["error"]["type"] == "RequestTimeoutError"
            times = client.ping()
            assert times[dead_url] is None and times[silent_url] is None
            assert isinstance(times[live.url], float) and times[live.url] > 0
        with Client([dead_url, "kvs://127.0.0.1:1"], timeout=0.5, retry_backoff=5) as nobody:
            with pytest.raises(ConnectError, match="no server answered"):
                nobody.stats()
            with pytest.raises(ConnectError, match="no server answered"):
                nobody.ping()
    finally:
        live.stop()
        silent.close()


def test_single_server_down_raises_and_backs_off() -> None:
    srv = InProcessServer().start()
    url = srv.url
    srv.stop()
    client = Client(url, timeout=1, retry_backoff=5)
    with pytest.raises(ConnectError, match="cannot connect"):
        client.get(chunk_key(1))
    start = time.monotonic()
    with pytest.raises(ConnectError, match="is down"):
        client.get(chunk_key(1))
    assert time.monotonic() - start < 0.5, "a server in back-off fails fast"
    client.close()


def _silent_server(greet: bool) -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conns.append(conn)
        if greet:
            meta = p.encode_meta(p.ServerHello(version=p.PROTOCOL_VERSION, max_payload=1 << 20))
            conn.sendall(p.pack_header(p.Op.HELLO, 0, len(meta), flags=p.Flag.REPLY) + meta)
            hello = conn.recv(4096)
            reply = p.encode_meta(p.HelloReply())
            rid = p.parse_header(hello[:32], 1 << 20).request_id
            conn.sendall(p.pack_header(p.Op.HELLO, rid, len(reply), flags=p.Flag.REPLY) + reply)
        time.sleep(3)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("greet", [False, True])
def test_timeouts_are_typed_and_bounded(greet: bool) -> None:
    listener, _thread = _silent_server(greet)
    client = Client(f"kvs://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        client.get(chunk_key(1))
    assert time.monotonic() - start < 2.5
    client.close()
    listener.close()


@pytest.mark.parametrize("checksum", [True, False])
def test_replies_are_read_in_pieces_and_land_whole(checksum: bool) -> None:
    """GET_MANY payloads are read (and checked) in pieces of about ``RECV_PIECE_BYTES``: chunks larger and
    smaller than a piece, into outs of their size, larger outs and none, land byte for byte; with checksums,
    a chunk whose bytes change in the server's memory after the put is a miss, whichever piece it is in."""
    piece = tcp.RECV_PIECE_BYTES
    sizes = [2 * piece + 123, 1, piece - 1, 3 * piece, piece + 1, 0, 5000]
    with (
        InProcessServer(capacity=16 << 20, slot=4 * piece) as srv,
        Client(srv.url, checksum=checksum) as client,
    ):
        keys = [chunk_key(i, b"pieces") for i in range(len(sizes))]
        data = [pattern(key, size) for key, size in zip(keys, sizes, strict=True)]
        client.put_many(keys, data)
        outs: list[torch.Tensor | None] = [
            None if i % 3 == 0 else torch.zeros(size + (i % 2) * 7, dtype=torch.uint8)
            for i, size in enumerate(sizes)
        ]
        got = client.get_many(keys, outs)
        for g, d in zip(got, data, strict=True):
            assert g is not None and torch.equal(g, d)
        if not checksum:
            return
        handle = srv.store.acquire(keys[0])
        assert handle is not None
        with handle:
            handle.data[piece + 5] ^= 0xFF  # in the chunk's second piece
        got = client.get_many(keys)
        assert got[0] is None
        for g, d in zip(got[1:], data[1:], strict=True):
            assert g is not None and torch.equal(g, d)


def test_corrupt_reply_is_a_miss_never_wrong_bytes() -> None:
    """A peer that sends a chunk whose bytes do not match their checksum."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        meta = p.encode_meta(p.ServerHello(version=p.PROTOCOL_VERSION, max_payload=1 << 20))
        conn.sendall(p.pack_header(p.Op.HELLO, 0, len(meta), flags=p.Flag.REPLY) + meta)
        rid = p.parse_header(conn.recv(4096)[:32], 1 << 20).request_id
        reply = p.encode_meta(p.HelloReply())
        conn.sendall(p.pack_header(p.Op.HELLO, rid, len(reply), flags=p.Flag.REPLY) + reply)
        rid = p.parse_header(conn.recv(4096)[:32], 1 << 20).request_id
        payload = b"A" * 100
        meta = p.encode_meta(p.GetManyReply(sizes=[100], checksums=[p.checksum(payload) ^ 0xFF]))
        flags = p.Flag.REPLY | p.Flag.CHECKSUM
        conn.sendall(p.pack_header(p.Op.GET_MANY, rid, len(meta), 100, flags=flags) + meta + payload)
        time.sleep(0.5)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Client(f"kvs://127.0.0.1:{listener.getsockname()[1]}", timeout=2)
    assert client.get(chunk_key(1)) is None
    client.close()
    thread.join()
    listener.close()


def test_concurrent_threads_share_the_pool() -> None:
    with InProcessServer() as srv, Client(srv.url, pool_size=2) as client:
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            try:
                for i in range(30):
                    key = chunk_key(seed * 100 + i, b"threads")
                    client.put(key, pattern(key, 2048))
                    got = client.get(key)
                    assert got is not None and torch.equal(got, pattern(key, 2048))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[0]
        assert srv.server is not None
        # Busy threads may open extra connections; only pool_size of them are kept afterwards.
        assert wait_until(lambda: srv.server is not None and srv.server.counters["connections"] <= 2)


def test_async_client_round_trip() -> None:
    with InProcessServer() as srv:

        async def main() -> None:
            async with AsyncClient(srv.url) as client:
                keys = [chunk_key(i, b"async") for i in range(8)]
                await asyncio.gather(*(client.put(k, pattern(k, 1000)) for k in keys))
                got = await client.get_many(keys)
                assert all(
                    g is not None and torch.equal(g, pattern(k, 1000)) for g, k in zip(got, keys, strict=True)
                )
                assert await client.exists(keys[:2]) == [True, True]
                assert (await client.lookup_prefix(keys)).num_chunks == 8
                assert await client.delete(keys[:1]) == 1
                assert await client.get(keys[0]) is None
                assert list(await client.ping()) == [srv.url]

        asyncio.run(main())
