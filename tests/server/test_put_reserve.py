"""PUT and PUT_MANY received straight into reserved slots: a put that cannot complete (failed checksum,
connection gone mid-payload) leaves no visible chunk and no held slot; fallbacks when none is reserved."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch

from kvstrata.client import Client
from kvstrata.kvstore.device import DeviceTier
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.transport import protocol as p
from tests.kvstore.conformance_tier import chunk_key
from tests.server.test_server import Raw, port_of, server_connections
from tests.transport.servers import InProcessServer, wait_until

pytestmark = pytest.mark.timeout(60)

SLOT = 256 << 10


@pytest.fixture
def server() -> Iterator[InProcessServer]:
    with InProcessServer(capacity=8 * SLOT, slot=SLOT) as srv:
        yield srv


def top_used(srv: InProcessServer) -> int:
    return int(srv.store.tiers[0].used_bytes)


def test_put_lands_in_a_slot_and_a_bad_checksum_leaves_the_old_value(server: InProcessServer) -> None:
    key = chunk_key(1, b"reserve")
    raw = Raw(port_of(server))
    first = os.urandom(SLOT)
    raw.send(p.Op.PUT, 2, p.PutRequest(key=key), first, crc=p.checksum(first))
    assert raw.frame().header.opcode == p.Op.PUT
    assert top_used(server) == SLOT
    second = os.urandom(SLOT)
    raw.send(p.Op.PUT, 3, p.PutRequest(key=key), second, crc=p.checksum(second) ^ 1)
    reply = raw.frame()
    assert reply.header.opcode == p.Op.ERROR and reply.meta.code == "corrupt"
    got = server.store.get(key)
    assert got is not None and bytes(got.numpy()) == first, "a failed put replaced the stored value"
    assert top_used(server) == SLOT, "the aborted reservation's slot leaked"
    raw.send(p.Op.PUT, 4, p.PutRequest(key=key), second)  # no checksum flag: stored as sent
    assert raw.frame().header.opcode == p.Op.PUT
    got = server.store.get(key)
    assert got is not None and bytes(got.numpy()) == second and top_used(server) == SLOT
    raw.close()


def test_connection_dying_mid_put_leaves_nothing(server: InProcessServer) -> None:
    key = chunk_key(2, b"reserve")
    raw = Raw(port_of(server))
    payload = os.urandom(SLOT)
    frame = raw.encode(p.Op.PUT, 5, p.PutRequest(key=key), payload, crc=p.checksum(payload))
    raw.sock.sendall(frame[: len(frame) - SLOT // 2])  # header, metadata, half the payload
    assert wait_until(lambda: top_used(server) == SLOT), "no slot was reserved for the payload"
    assert not server.store.contains(key) and server.store.get(key) is None, "a partial chunk is visible"
    raw.sock.shutdown(socket.SHUT_RDWR)
    raw.close()
    assert wait_until(lambda: server_connections(server) == 0)
    assert wait_until(lambda: top_used(server) == 0), "the reservation outlived its connection"
    assert not server.store.contains(key)


def put_many_frame(raw: Raw, rid: int, keys: list[bytes], chunks: list[bytes], bad: set[int]) -> bytes:
    items = [
        p.PutItem(key=k, size=len(c), checksum=p.checksum(c) ^ (1 if i in bad else 0))
        for i, (k, c) in enumerate(zip(keys, chunks, strict=True))
    ]
    return raw.encode(p.Op.PUT_MANY, rid, p.PutManyRequest(items=items), b"".join(chunks), crc=0)


def test_put_many_stores_the_good_chunks_and_refuses_the_corrupt_one(server: InProcessServer) -> None:
    keys = [chunk_key(i, b"many") for i in range(4)]
    chunks = [os.urandom(SLOT // (i + 1)) for i in range(4)]
    raw = Raw(port_of(server))
    raw.sock.sendall(put_many_frame(raw, 7, keys, chunks, bad={1}))
    reply = raw.frame()
    assert reply.header.opcode == p.Op.PUT_MANY and reply.meta.results == ["", "corrupt", "", ""]
    assert not server.store.contains(keys[1])
    for i in (0, 2, 3):
        got = server.store.get(keys[i])
        assert got is not None and bytes(got.numpy()) == chunks[i]
    held = sum(server.store.tiers[0].slot_span(k) is not None for k in keys)  # type: ignore[union-attr]
    assert held == 3 and len(server.store.tiers[0]) == 3
    raw.close()


def test_connection_dying_mid_put_many_leaves_nothing(server: InProcessServer) -> None:
    keys = [chunk_key(i, b"dies") for i in range(4)]
    chunks = [os.urandom(SLOT) for _ in range(4)]
    raw = Raw(port_of(server))
    frame = put_many_frame(raw, 8, keys, chunks, bad=set())
    raw.sock.sendall(frame[: len(frame) - SLOT - SLOT // 2])  # two whole chunks and half the third
    assert wait_until(lambda: top_used(server) == 4 * SLOT), "the frame's slots were not reserved"
    assert not any(server.store.contains(k) for k in keys), "uncommitted chunks are visible"
    raw.close()
    assert wait_until(lambda: server_connections(server) == 0)
    assert wait_until(lambda: top_used(server) == 0), "reservations leaked"
    assert not any(server.store.contains(k) for k in keys)


def test_put_many_beyond_the_inflight_budget_and_top_tier_turnover() -> None:
    # Runs of at most two slots in flight; ten chunks through an eight-slot tier (the oldest evicted).
    with InProcessServer(capacity=8 * SLOT, slot=SLOT, max_inflight_bytes=2 * SLOT) as srv:
        keys = [chunk_key(i, b"budget") for i in range(10)]
        data = [torch.randint(0, 256, (SLOT - i,), dtype=torch.uint8) for i in range(10)]
        with Client(srv.url) as client:
            client.put_many(keys, data)
            got = client.get_many(keys[2:])
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data[2:], strict=True))
        assert top_used(srv) == 8 * SLOT and len(srv.store.tiers[0]) == 8


def test_falls_back_to_a_copy_when_no_slot_can_be_reserved() -> None:
    # The top tier's only slot is pinned by a reader: the put lands in the tier below, as Store.put does.
    tiers = [DeviceTier(SLOT, SLOT, device="cpu"), HostTier(4 * SLOT, SLOT)]
    store = Store(tiers, high_watermark=1.0, low_watermark=1.0)  # no background demotion of the pinned one
    with InProcessServer(store=store) as srv, Client(srv.url) as client:
        pinned = chunk_key(1, b"fallback")
        client.put(pinned, torch.ones(SLOT, dtype=torch.uint8))
        handle = store.acquire(pinned)
        assert handle is not None and store.tiers[0].contains(pinned)
        with handle:
            keys = [chunk_key(i, b"fallback") for i in range(2, 5)]
            data = [torch.full((SLOT // 2,), i, dtype=torch.uint8) for i in range(3)]
            client.put(keys[0], data[0])
            client.put_many(keys[1:], data[1:])
            assert all(store.tiers[1].contains(k) for k in keys)
            got = client.get_many(keys)
            assert all(g is not None and torch.equal(g, d) for g, d in zip(got, data, strict=True))


def test_checked_crc_is_kept_and_catches_corruption_after_the_put(server: InProcessServer) -> None:
    """A put with a checksum keeps the checked CRC-32C with the chunk; gets answer with it, so bytes that
    change in the server's memory after the put reach the client as a miss, never as a hit."""
    keys = [chunk_key(i, b"crc-kept") for i in range(3)]
    data = [torch.randint(0, 256, (SLOT // 2,), dtype=torch.uint8) for _ in keys]
    with Client(f"kvs://127.0.0.1:{port_of(server)}", checksum=True) as client:
        client.put_many(keys, data)
        for key, chunk in zip(keys, data, strict=True):
            meta = server.store.get_meta(key)
            assert meta is not None
            assert meta.crc32c == p.checksum(memoryview(chunk.numpy()))
        handle = server.store.acquire(keys[1])
        assert handle is not None
        with handle:
            handle.data[7] ^= 0xFF  # a bit flip in the pool after the put
        got = client.get_many(keys)
        assert got[1] is None
        assert got[0] is not None and torch.equal(got[0], data[0])
        assert got[2] is not None and torch.equal(got[2], data[2])
        single = client.get(keys[1])
        assert single is None
    with Client(f"kvs://127.0.0.1:{port_of(server)}", checksum=False) as client:
        client.put(keys[0], data[0])
        meta = server.store.get_meta(keys[0])
        assert meta is not None and meta.crc32c == -1  # not checked on the way in: not known


def _hold_busy(port: int, slot: int, key: bytes) -> tuple[Raw, bytes, int]:
    """A raw connection with a PUT under way (its header and part of its payload sent), so that the server
    serves another connection meanwhile; returns it, the frame and how much of it went out."""
    raw = Raw(port)
    payload = os.urandom(slot)
    frame = raw.encode(p.Op.PUT, 9, p.PutRequest(key=key), payload, crc=p.checksum(memoryview(payload)))
    sent = len(frame) - len(payload) + 4096
    raw.sock.sendall(frame[:sent])
    return raw, frame, sent


def _finish(raw: Raw, frame: bytes, sent: int) -> None:
    raw.sock.sendall(frame[sent:])
    reply = raw.frame()
    assert reply.header.opcode == p.Op.PUT and reply.header.request_id == 9
    raw.close()


@pytest.mark.parametrize("bulk_threads", [0, 2])
@pytest.mark.parametrize("checksum", [True, False])
def test_large_transfers_on_bulk_threads_or_the_event_loop(bulk_threads: int, checksum: bool) -> None:
    """Put payloads of megabytes are read by blocking calls on bulk I/O threads while another connection is
    being served, and on the event loop when theirs is the only one or no thread is free (0 here): the
    same bytes either way."""
    slot = 4 << 20
    with InProcessServer(capacity=24 * slot, slot=slot, bulk_threads=bulk_threads) as srv:
        counters = srv.server.counters  # type: ignore[union-attr]
        keys = [chunk_key(i, b"bulk") for i in range(10)]
        data = [torch.randint(0, 256, (slot - 4096 * i,), dtype=torch.uint8) for i in range(10)]
        with Client(srv.url, checksum=checksum) as client:
            client.put_many(keys[:5], data[:5])  # the only connection: read on the event loop
            assert counters["bulk_transfers"] == 0
            raw, frame, sent = _hold_busy(port_of(srv), slot, chunk_key(99, b"bulk"))
            assert wait_until(lambda: srv.server.busy_connections == 1, timeout=10)  # type: ignore[union-attr]
            client.put_many(keys[5:], data[5:])  # served alongside the raw put
            _finish(raw, frame, sent)
            got = client.get_many(keys)
        for g, d in zip(got, data, strict=True):
            assert g is not None and torch.equal(g, d)
        assert counters["bulk_transfers"] >= (5 if bulk_threads else 0)
        assert counters["bulk_transfers"] <= (6 if bulk_threads else 0)


def test_a_writer_that_stalls_mid_payload_is_finished_on_the_event_loop() -> None:
    """A peer that stops sending in the middle of a large payload holds a bulk thread for one time slice
    only; the rest of its payload is read on the event loop, and other clients are served meanwhile."""
    slot = 4 << 20
    with InProcessServer(capacity=8 * slot, slot=slot, bulk_threads=1) as srv:
        counters = srv.server.counters  # type: ignore[union-attr]
        # Another connection in the middle of its own put, so that the stalling one's payload goes to the
        # bulk thread.
        busy, busy_frame, busy_sent = _hold_busy(port_of(srv), slot, chunk_key(3, b"stall"))
        assert wait_until(lambda: srv.server.busy_connections == 1, timeout=10)  # type: ignore[union-attr]
        key = chunk_key(1, b"stall")
        payload = os.urandom(slot)
        raw = Raw(port_of(srv))
        frame = raw.encode(p.Op.PUT, 2, p.PutRequest(key=key), payload, crc=p.checksum(memoryview(payload)))
        head = len(frame) - len(payload)
        raw.sock.sendall(frame[: head + slot // 3])
        # the bulk thread gives the stalled payload back to the event loop after its time slice
        assert wait_until(lambda: counters["bulk_handbacks"] >= 1, timeout=10)
        assert counters["bulk_transfers"] >= 1
        with Client(srv.url) as other:  # served while the first writer stalls
            other.put(chunk_key(2, b"stall"), torch.ones(slot, dtype=torch.uint8))
            assert other.exists([chunk_key(2, b"stall")]) == [True]
        raw.sock.sendall(frame[head + slot // 3 :])
        reply = raw.frame()
        assert reply.header.opcode == p.Op.PUT and reply.header.request_id == 2
        _finish(busy, busy_frame, busy_sent)
        raw.close()
        with Client(srv.url) as client:
            got = client.get(key)
        assert got is not None and bytes(got.numpy()) == payload
