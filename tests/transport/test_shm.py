"""The shm transport end to end against real ``kvstrata serve`` processes, and its lease rules."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvstrata.client import Client
from kvstrata.errors import AuthenticationError, ConnectError, ProtocolError, RequestTimeoutError
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.server import lease as lease_server
from kvstrata.transport import lease as ls
from kvstrata.transport.base import TransportOptions, parse_url
from kvstrata.transport.shm import SHM_DIR, SharedSegment, ShmTransport, sweep_stale_segments
from kvstrata.transport.tcp import TcpTransport
from tests.conftest import require
from tests.transport.servers import ServeProcess

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no POSIX shared memory")

SHM_ENV = {"KVSTRATA_SERVER_TRANSPORTS": "tcp,shm"}


def _chunks(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen) for _ in range(n)]


def _keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


TOKEN = "a-shared-token-for-the-shm-tests"


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("shm")
    (tmp / "token").write_text(TOKEN + "\n")
    server = ServeProcess(tmp, "--token-file", str(tmp / "token"), env=SHM_ENV).start()
    try:
        yield server
    finally:
        _shutdown(server)


def _shutdown(server: ServeProcess) -> None:
    """SIGTERM, so that the server unlinks its segment; SIGKILL if it hangs."""
    try:
        if server.proc is not None and server.proc.poll() is None:
            server.terminate(timeout=20)
    finally:
        server.kill()


def _shm_url(server: ServeProcess) -> str:
    return f"kvs+shm://127.0.0.1:{server.port}"


def test_round_trip_through_shared_memory(shm_server: ServeProcess) -> None:
    sizes = [1, 4096, 300_000, 4 * 1024**2]  # 4 MiB is the server's slot size
    keys = _keys(len(sizes))
    datas = [_chunks(1, s, seed=i)[0] for i, s in enumerate(sizes)]
    with Client(_shm_url(shm_server), token=TOKEN) as client:
        client.put_many(keys, datas)
        outs = [torch.empty(s + 7, dtype=torch.uint8) for s in sizes]
        got = client.get_many(keys, outs)
        for g, d, o in zip(got, datas, outs, strict=True):
            assert g is not None and torch.equal(g, d)
            assert g.data_ptr() == o.data_ptr()  # filled in place
        fresh = client.get(keys[2])
        assert fresh is not None and torch.equal(fresh, datas[2])
        assert client.get(os.urandom(16)) is None
        assert client.exists([keys[0], os.urandom(16)]) == [True, False]
        assert client.lookup_prefix([*keys, os.urandom(16)]).num_chunks == len(keys)
        assert client.delete([keys[0]]) == 1
        assert client.get(keys[0]) is None
    # what went in through shared memory comes out over tcp, byte for byte, and the other way round
    tcp_key = os.urandom(16)
    (tcp_data,) = _chunks(1, 123_457, seed=9)
    with Client(f"kvs://127.0.0.1:{shm_server.port}", token=TOKEN) as tcp:
        got = tcp.get(keys[3])
        assert got is not None and torch.equal(got, datas[3])
        tcp.put(tcp_key, tcp_data)
    with Client(_shm_url(shm_server), token=TOKEN) as client:
        got = client.get(tcp_key)
        assert got is not None and torch.equal(got, tcp_data)


def test_transport_maps_a_private_segment_not_named_in_the_greeting(shm_server: ServeProcess) -> None:
    options = TransportOptions(token=TOKEN.encode())
    plain = TcpTransport(parse_url(f"kvs://127.0.0.1:{shm_server.port}"), options)
    plain.connect(5.0)
    try:
        assert plain.greeting is not None and "shm" in plain.greeting.transports
        assert "kvstrata-shm-" not in repr(plain.greeting)
    finally:
        plain.close()
    transport = ShmTransport(parse_url(_shm_url(shm_server)), options)
    transport.connect(5.0)
    try:
        segment = transport.segment
        assert segment is not None
        st = os.stat(os.path.join(SHM_DIR, segment.name))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
        key = os.urandom(16)
        (data,) = _chunks(1, 65_536, seed=3)
        from kvstrata.core.chunk import EMPTY_META
        from kvstrata.transport.base import PutSpec

        assert transport.put_many([PutSpec(key, data, EMPTY_META)], 5.0) == [None]
        # the chunk's bytes lie in the mapped segment: find them there
        reply = transport._call(
            5.0, lambda: transport._reply(transport._request(0x41, ls.LeaseGetRequest(keys=[key])), 0x41)[1]
        )
        (position,) = reply.positions
        assert torch.equal(segment.tensor[position : position + data.numel()], data)
        assert transport._call(5.0, transport._release, list(reply.leases)) == [True]
        assert transport._call(5.0, transport._release, list(reply.leases)) == [False]  # already ended
    finally:
        transport.close()


def test_auth_is_required_before_attaching(shm_server: ServeProcess) -> None:
    url = _shm_url(shm_server)
    with pytest.raises(AuthenticationError), Client(url) as anon:
        anon.get(os.urandom(16))
    with pytest.raises(AuthenticationError), Client(url, token="a-wrong-token-of-enough-length") as bad:
        bad.get(os.urandom(16))
    key = os.urandom(16)
    (data,) = _chunks(1, 10_000, seed=5)
    with Client(url, token=TOKEN) as good:
        good.put(key, data)
        got = good.get(key)
        assert got is not None and torch.equal(got, data)


def test_server_killed_mid_stream_then_restarted(shm_server: ServeProcess) -> None:
    server = shm_server
    wrong: list[int] = []
    outcomes = {"hits": 0, "misses": 0, "errors": 0}
    stop = threading.Event()
    keys = _keys(8)
    datas = _chunks(8, 512 * 1024, seed=11)
    client = Client(_shm_url(server), token=TOKEN, timeout=2.0, retry_backoff=0.05)
    client.put_many(keys, datas)
    old_segment = next(name for name in os.listdir(SHM_DIR) if f"-{server.proc.pid}-" in name)  # type: ignore[union-attr]

    def stream() -> None:
        while not stop.is_set():
            try:
                client.put_many(keys[:4], datas[:4])
                got = client.get_many(keys, [torch.empty(512 * 1024, dtype=torch.uint8) for _ in keys])
            except (ConnectError, RequestTimeoutError):
                outcomes["errors"] += 1
                time.sleep(0.01)
                continue
            for i, g in enumerate(got):
                if g is None:
                    outcomes["misses"] += 1
                elif torch.equal(g, datas[i]):
                    outcomes["hits"] += 1
                else:
                    wrong.append(i)
            time.sleep(0.005)  # leave the restarting server some CPU on a small machine

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        time.sleep(0.3)
        server.kill()  # SIGKILL: no cleanup, leases and the segment left behind
        time.sleep(0.3)
        hits_before = outcomes["hits"]
        server.start()  # same port; sweeps the dead server's segment
        deadline = time.monotonic() + 15
        while outcomes["hits"] <= hits_before + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)
        client.close()
    assert not wrong, "wrong bytes were returned as a hit"
    assert outcomes["errors"] > 0 or outcomes["misses"] > 0
    assert outcomes["hits"] > hits_before + 8, "the client did not recover after the restart"
    assert not os.path.exists(os.path.join(SHM_DIR, old_segment))


# -- the lease rules, on a real store, without a server ---------------------------------------------


def _lease_server(store: Store, seg: torch.Tensor, pool: int, ttl: float = 30.0) -> lease_server.LeaseServer:
    base = seg.data_ptr()

    def locate(t: torch.Tensor) -> int | None:
        off = t.data_ptr() - base
        return off if off >= 0 and off + t.numel() <= pool else None

    staging = lease_server.StagingPool(seg[pool:], 4096)
    return lease_server.LeaseServer(0x40, staging, locate, lambda slot: pool + slot * 4096, lease_ttl_s=ttl)


def test_a_leased_slot_is_not_reused_and_an_expired_lease_reads_as_invalid() -> None:
    pool = 4 * 4096
    seg = torch.zeros(pool + 2 * 4096, dtype=torch.uint8)
    store = Store([HostTier(pool, 4096, buffer=seg[:pool])])
    try:
        leases = _lease_server(store, seg, pool)
        key = os.urandom(16)
        store.put(key, torch.full((4096,), 7, dtype=torch.uint8))
        reply = leases.lease_get(1, store, [key, os.urandom(16)])
        assert reply.sizes == [4096, -1]
        (position, _) = reply.positions
        # the chunk is replaced and the tier is filled: the leased slot must keep its bytes
        store.remove(key)
        for i in range(4):
            store.put(os.urandom(16), torch.full((4096,), i, dtype=torch.uint8))
        assert bool((seg[position : position + 4096] == 7).all())
        assert leases.release(1, [reply.leases[0]]).valid == [True]
        # another owner cannot release a lease that is not its own; an expired one is invalid
        store.put(key, torch.full((4096,), 8, dtype=torch.uint8))
        lease = leases.lease_get(1, store, [key]).leases[0]
        assert leases.release(2, [lease]).valid == [False]
        assert leases.reap(now=time.monotonic() + 31) == 1
        assert leases.release(1, [lease]).valid == [False]
    finally:
        store.close()


def test_staging_for_chunks_outside_shared_memory_and_quarantine_of_expired_puts() -> None:
    seg = torch.zeros(2 * 4096, dtype=torch.uint8)
    store = Store([HostTier(4 * 4096, 4096)])  # not in the segment: gets are staged
    try:
        leases = _lease_server(store, seg, 0)
        keys = _keys(3)
        for i, key in enumerate(keys):
            store.put(key, torch.full((100,), i + 1, dtype=torch.uint8))
        reply = leases.lease_get(1, store, keys)
        assert reply.sizes == [100, 100, -2]  # two staging slots, the third is deferred
        for i, pos in enumerate(reply.positions[:2]):
            assert bool((seg[pos : pos + 100] == i + 1).all())
        leases.release(1, reply.leases[:2])
        # a put lease that expires keeps its slot out of use until the owner goes away
        begin = leases.put_begin(5, [100, 100])
        assert all(begin.leases) and leases.staging.free_slots == 0
        leases.reap(now=time.monotonic() + 31)
        assert leases.staging.free_slots == 0
        commit = leases.put_commit(5, store, [ls.PutCommitItem(lease=begin.leases[0], key=keys[0], size=100)])
        assert commit.results == ["busy"]
        leases.owner_closed(5)
        assert leases.staging.free_slots == 2
        # a committed put is stored from its staging slot
        begin = leases.put_begin(6, [50])
        seg[begin.positions[0] : begin.positions[0] + 50].fill_(42)
        done = leases.put_commit(6, store, [ls.PutCommitItem(lease=begin.leases[0], key=keys[2], size=50)])
        assert done.results == [""]
        got = store.get(keys[2])
        assert got is not None and got.numel() == 50 and bool((got == 42).all())
        assert leases.staging.free_slots == 2 and leases.active == 0
    finally:
        store.close()


def test_segments_of_dead_servers_are_swept() -> None:
    require(os.path.isdir(SHM_DIR), "POSIX shared memory")
    segment = SharedSegment.create(4096)
    dead = segment.name.replace(f"-{os.getpid()}-", "-999999999-")
    os.rename(os.path.join(SHM_DIR, segment.name), os.path.join(SHM_DIR, dead))
    segment.name = dead
    try:
        assert sweep_stale_segments() >= 1
        assert not os.path.exists(os.path.join(SHM_DIR, dead))
    finally:
        segment.close()


def test_leases_of_a_stalled_client_expire_on_their_own() -> None:
    import asyncio

    pool = 4096
    seg = torch.zeros(pool + 4096, dtype=torch.uint8)
    store = Store([HostTier(pool, 4096, buffer=seg[:pool])])  # one slot
    try:
        leases = _lease_server(store, seg, pool, ttl=0.05)
        key = os.urandom(16)
        store.put(key, torch.full((4096,), 1, dtype=torch.uint8))

        async def stall() -> None:
            reply = leases.lease_get(1, store, [key])
            assert reply.sizes == [4096]
            leases._schedule_reaper()
            await asyncio.sleep(0.5)  # no further request from anyone

        asyncio.run(stall())
        assert leases.active == 0 and leases.counters["expired"] == 1
        # the chunk is unpinned again: the only slot can be reused
        other = os.urandom(16)
        store.put(other, torch.full((4096,), 2, dtype=torch.uint8))
        assert store.get(key) is None and store.get(other) is not None
    finally:
        store.close()


class _SlowShmTransport(ShmTransport):
    """An shm client whose copies take 50 ms (a stalled reader)."""

    def _read_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        time.sleep(0.05)
        super()._read_many(spans)


@pytest.mark.parametrize(("ttl", "hit"), [(0.02, False), (30.0, True)])
def test_bytes_read_under_an_expired_lease_are_a_miss(ttl: float, hit: bool) -> None:
    from kvstrata.server.shm import ShmServerExtension
    from tests.transport.servers import InProcessServer

    ext = ShmServerExtension(None, staging_slots=2, lease_ttl_s=ttl)
    server = InProcessServer(capacity=4 << 20, slot=1 << 20, extensions=[ext])
    ext.attach(server.store)  # a store not in shared memory: gets are staged
    with server:
        key = os.urandom(16)
        (data,) = _chunks(1, 100_000, seed=21)
        server.store.put(key, data)
        transport = _SlowShmTransport(
            parse_url(f"kvs+shm://127.0.0.1:{server.server.port}"), TransportOptions()
        )  # type: ignore[union-attr]
        try:
            transport.connect(5.0)
            (got,) = transport.get_many([key], [None], 5.0)
            if hit:
                assert got is not None and torch.equal(got, data)
            else:
                assert got is None  # the lease ran out mid-copy: never returned as a hit
            assert transport.exists([key], 5.0) == [True]  # the connection stays in step
        finally:
            transport.close()
    ext.close()


def test_a_segment_larger_than_free_shared_memory_is_refused() -> None:
    from kvstrata.errors import ConfigError

    st = os.statvfs(SHM_DIR)
    with pytest.raises(ConfigError, match="shared memory"):
        SharedSegment.create(st.f_bavail * st.f_frsize + (1 << 30))


def test_too_little_shared_memory_degrades_instead_of_failing() -> None:
    from types import SimpleNamespace

    from kvstrata.server.shm import ShmServerExtension

    st = os.statvfs(SHM_DIR)
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    ext = ShmServerExtension(SimpleNamespace(store=SimpleNamespace(slot_bytes=1 << 20)))
    assert ext.host_buffer(too_big) is None  # the host tier keeps private memory
    store = Store([HostTier(4 << 20, 1 << 20)])
    try:
        ext.attach(store)  # staging alone fits: the transport works, gets are staged
        assert ext.leases is not None and ext.pool_bytes == 0
        ext.close()
        starved = ShmServerExtension(SimpleNamespace(store=SimpleNamespace(slot_bytes=too_big)))
        starved.attach(store)  # not even staging fits: switched off, nothing raised
        assert starved.leases is None and starved.segment is None
    finally:
        store.close()


def test_more_chunks_than_staging_slots_and_a_chunk_too_large(shm_server: ServeProcess) -> None:
    from kvstrata.errors import ChunkTooLargeError

    keys = _keys(40)  # more than the 32 staging slots: committed in several rounds
    datas = _chunks(40, 8192, seed=31)
    with Client(_shm_url(shm_server), token=TOKEN) as client:
        client.put_many(keys, datas)
        got = client.get_many(keys)
        assert all(g is not None and torch.equal(g, d) for g, d in zip(got, datas, strict=True))
        # larger than a slot: no staging lease, so it goes over tcp, and the server refuses it there
        with pytest.raises(ChunkTooLargeError):
            client.put(os.urandom(16), torch.zeros(5 * 1024**2, dtype=torch.uint8))
        # the connection is still in step afterwards
        again = client.get(keys[0])
        assert again is not None and torch.equal(again, datas[0])


def test_attach_replies_carry_segments_larger_than_a_frame() -> None:
    from kvstrata.transport import protocol as p
    from kvstrata.transport.shm import MAX_SEGMENT_BYTES, SHM_BASE, ShmAttachReply

    op = SHM_BASE + ls.ATTACH
    big = ShmAttachReply(
        segment="kvstrata-shm-1-0123456789abcdef", size=6 << 30, pool_bytes=(6 << 30) - (1 << 27)
    )
    assert p.decode_meta(op, True, p.encode_meta(big)) == big
    too_big = ShmAttachReply(segment=big.segment, size=MAX_SEGMENT_BYTES + 1)
    with pytest.raises(ProtocolError, match="malformed"):
        p.decode_meta(op, True, p.encode_meta(too_big))


def test_a_host_pool_over_4_gib_in_shared_memory(tmp_path: Path) -> None:
    # The default host cache is sized from RAM, so a server's segment is often larger than 4 GiB (the
    # largest payload): the client must still attach. The pool's pages are committed only as used.
    host = (4 << 30) + (256 << 20)
    st = os.statvfs(SHM_DIR)
    require(st.f_bavail * st.f_frsize > host + (1 << 30), f"{host >> 20} MiB of free shared memory")
    server = ServeProcess(tmp_path, "--host-cache", str(host), env=SHM_ENV).start()
    try:
        keys = _keys(3)
        datas = _chunks(3, 1 << 20, seed=5)
        logged = re.search(r"host pool in shared memory \S+ \((\d+) bytes\)", server.log.read_text())
        assert logged is not None and int(logged.group(1)) > host  # not the private-memory fallback
        with Client(_shm_url(server)) as client:
            client.put_many(keys, datas)
            got = client.get_many(keys)
            assert all(g is not None and torch.equal(g, d) for g, d in zip(got, datas, strict=True))
    finally:
        _shutdown(server)
