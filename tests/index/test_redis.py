"""The Redis backend against a real, private redis-server: conformance, faults, outages, key schema."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvstrata.config import IndexConfig
from kvstrata.errors import IndexUnavailableError
from kvstrata.index.base import BlockIndex, open_index
from tests.conftest import RedisServer, free_port, require
from tests.index.conformance_index import IndexConformance, make_keys, summary

try:
    import redis
except ImportError:  # pragma: no cover - redis-py is a dev dependency
    redis = None


@pytest.fixture(autouse=True)
def _redis_client() -> None:
    require(redis is not None, "the redis Python client (redis-py)")


CONFIG = IndexConfig(lease_ttl_s=600.0, redis_timeout_s=0.5, flush_interval_s=0.002)


class TestRedisConformance(IndexConformance):
    @pytest.fixture
    def index(self, redis_server: RedisServer) -> Iterator[BlockIndex]:
        idx = open_index(redis_server.url, namespace="conf", config=CONFIG)
        yield idx
        idx.close()


class FaultProxy:
    """A TCP proxy in front of Redis whose ``cut()`` resets every connection through it (a real fault)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()  # linger 0: the peer sees a reset
            except OSError:
                pass
        self.cuts += 1

    def close(self) -> None:
        self._listener.close()
        self.cut()


class FaultInjectingIndex(BlockIndex):
    """Delegates to a Redis index whose connections are reset before every call."""

    def __init__(self, inner: BlockIndex, proxy: FaultProxy) -> None:
        super().__init__()
        self.inner = inner
        self.proxy = proxy

    def add(self, instance: str, tier: str, keys: Any) -> None:
        self.proxy.cut()
        self.inner.add(instance, tier, keys)

    def remove(self, instance: str, tier: str, keys: Any) -> None:
        self.proxy.cut()
        self.inner.remove(instance, tier, keys)

    def clear(self, instance: str) -> None:
        self.proxy.cut()
        self.inner.clear(instance)

    def lookup(self, keys: Any) -> Any:
        self.proxy.cut()
        return self.inner.lookup(keys)

    def heartbeat(self, instance: str, ttl_s: float | None = None) -> None:
        self.proxy.cut()
        self.inner.heartbeat(instance, ttl_s)

    def instances(self) -> Any:
        self.proxy.cut()
        return self.inner.instances()

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.inner.flush(timeout_s)

    def close(self) -> None:
        self.inner.close()


class TestRedisConformanceUnderConnectionResets(IndexConformance):
    """The same suite while every connection is reset before each call: one reconnect hides it."""

    @pytest.fixture
    def index(self, redis_server: RedisServer) -> Iterator[BlockIndex]:
        proxy = FaultProxy(redis_server.port)
        inner = open_index(f"redis://127.0.0.1:{proxy.port}/0", namespace="faulty", config=CONFIG)
        idx = FaultInjectingIndex(inner, proxy)
        yield idx
        idx.close()
        assert proxy.cuts > 0
        proxy.close()


def test_lookup_is_one_round_trip(redis_server: RedisServer) -> None:
    idx = open_index(redis_server.url, namespace="rt", config=CONFIG)
    keys = make_keys(1000)
    idx.add("a", "host", keys)
    assert idx.flush()
    idx.lookup(keys)  # loads the script
    sent: list[int] = []
    client = idx._redis  # type: ignore[attr-defined]
    conn = client.connection_pool.get_connection()
    original = conn.send_packed_command

    def counting(command: Any, check_health: bool = True) -> None:
        sent.append(1)
        original(command, check_health)

    conn.send_packed_command = counting  # type: ignore[method-assign]
    client.connection_pool.release(conn)
    result = idx.lookup(keys)
    assert summary(result) == {"a": (1000, {"host": 1000})}
    assert len(sent) == 1
    idx.close()


def test_all_keys_share_the_namespace_hash_tag(redis_server: RedisServer) -> None:
    idx = open_index(redis_server.url, namespace="model-x", config=CONFIG)
    idx.add("a", "host", make_keys(5))
    idx.clear("b")
    idx.heartbeat("c")
    assert idx.flush()
    raw = redis.Redis(port=redis_server.port)
    names = list(raw.scan_iter(count=1000))
    assert len(names) >= 5 + 5
    assert all(name.startswith(b"{kvs:model-x}:") for name in names)
    from redis.cluster import key_slot

    assert len({key_slot(name) for name in names}) == 1
    idx.close()


def test_namespaces_are_isolated(redis_server: RedisServer) -> None:
    one = open_index(redis_server.url, namespace="one", config=CONFIG)
    two = open_index(redis_server.url, namespace="two", config=CONFIG)
    keys = make_keys(4)
    one.add("a", "host", keys)
    assert one.flush()
    assert two.lookup(keys).matches == {}
    assert summary(one.lookup(keys)) == {"a": (4, {"host": 4})}
    one.close()
    two.close()


def test_redis_outage_degrades_and_recovers(redis_server: RedisServer) -> None:
    """Redis killed and restarted during lookups and writes: nothing escapes, the index converges."""
    idx = open_index(redis_server.url, namespace="outage", config=CONFIG)
    before = make_keys(8, "before")
    during = make_keys(8, "during")
    idx.add("a", "host", before)
    assert idx.flush()
    errors: list[BaseException] = []
    degraded = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal degraded
        try:
            while not stop.is_set():
                if idx.lookup(before).degraded:
                    degraded += 1
                time.sleep(0.005)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    redis_server.stop()
    time.sleep(0.1)
    idx.add("b", "disk", during)  # buffered, retried
    idx.remove("a", "host", before[4:])
    assert idx.flush(timeout_s=0.3) is False
    result = idx.lookup(during)
    assert result.degraded and result.matches == {}
    with pytest.raises(IndexUnavailableError):
        idx.instances()
    redis_server.start()
    assert idx.flush(timeout_s=10.0)
    stop.set()
    thread.join()
    assert errors == []
    assert degraded > 0
    assert idx.stats.errors > 0
    # the writes made during the outage are there; the restarted Redis (no persistence) lost the rest
    assert summary(idx.lookup(during)) == {"b": (8, {"disk": 8})}
    assert idx.lookup(before).matches == {}
    idx.add("a", "host", before)
    assert idx.flush()
    assert summary(idx.lookup(before)) == {"a": (8, {"host": 8})}
    idx.close()


def test_write_buffer_is_bounded(redis_server: RedisServer) -> None:
    config = IndexConfig(lease_ttl_s=600.0, redis_timeout_s=0.2, write_buffer=50)
    idx = open_index(redis_server.url, namespace="bounded", config=config)
    redis_server.stop()
    for i in range(10):
        idx.add("a", "host", make_keys(20, f"batch{i}"))
    stats = idx.snapshot_stats()  # type: ignore[attr-defined]
    assert stats.buffered <= 50
    assert stats.dropped_writes >= 150
    redis_server.start()
    assert idx.flush(timeout_s=10.0)
    # the newest writes survived, the oldest were dropped
    assert summary(idx.lookup(make_keys(20, "batch9"))) == {"a": (20, {"host": 20})}
    assert idx.lookup(make_keys(20, "batch0")).matches == {}
    idx.close()


def test_two_clients_share_one_index(redis_server: RedisServer) -> None:
    writer = open_index(redis_server.url, namespace="shared", config=CONFIG)
    reader = open_index(redis_server.url, namespace="shared", config=CONFIG)
    keys = make_keys(30)
    writer.add("engine-1", "device", keys[:20])
    writer.add("engine-2", "host", keys)
    assert writer.flush()
    assert summary(reader.lookup(keys)) == {
        "engine-1": (20, {"device": 20}),
        "engine-2": (30, {"host": 30}),
    }
    writer.clear("engine-2")
    assert writer.flush()
    assert set(reader.lookup(keys).matches) == {"engine-1"}
    writer.close()
    reader.close()
