"""A real ``kvstrata serve`` publishes its tiers to the block index (``--index``): memory and Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kvstrata.client import Client
from kvstrata.config import IndexConfig
from kvstrata.core.keys import ChunkKey, Namespace, block_keys
from kvstrata.index.base import open_index
from tests.conftest import RedisServer
from tests.transport.servers import ServeProcess, wait_until

pytestmark = pytest.mark.timeout(120)


def _chunk(salt: str, blocks: int = 4) -> ChunkKey:
    ns = Namespace("index-e2e", bytes(16))
    keys = block_keys(ns, [ord(c) for c in salt] * (4 * blocks), 4)[:blocks]
    return ChunkKey(keys[-1], tuple(keys), 0)


def _index_lookup(server: ServeProcess, keys: list[bytes]) -> dict[str, object]:
    url = f"http://127.0.0.1:{server.admin_port}/v1/index/lookup"
    response = httpx.get(url, params={"keys": ",".join(k.hex() for k in keys)}, timeout=5)
    response.raise_for_status()
    data: dict[str, object] = response.json()
    return data


def _admin_up(server: ServeProcess) -> bool:
    # The admin port opens a moment after the data port (whose log line ServeProcess waits for).
    try:
        return httpx.get(f"http://127.0.0.1:{server.admin_port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_memory_index_follows_puts_and_deletes(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, env={"KVSTRATA_INSTANCE_ID": "cache-a"}).start()
    try:
        assert wait_until(lambda: _admin_up(server), timeout=30)
        chunk = _chunk("a")
        with Client(server.url) as client:
            client.put(chunk, b"x" * 4096)
            other = list(_chunk("b").block_keys)
            assert wait_until(
                lambda: bool(_index_lookup(server, list(chunk.block_keys))["matches"]), timeout=20
            )
            found = _index_lookup(server, [*chunk.block_keys, *other])
            assert found["matches"] == [{"instance": "cache-a", "blocks": 4, "tiers": {"host": 4}}]
            assert _index_lookup(server, other)["matches"] == []
            assert client.delete(chunk) == 1
            assert wait_until(
                lambda: _index_lookup(server, list(chunk.block_keys))["matches"] == [], timeout=20
            )
    finally:
        server.kill()


def test_redis_index_is_shared_and_expires_with_the_lease(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {"KVSTRATA_INSTANCE_ID": "cache-r", "KVSTRATA_INDEX_LEASE_TTL_S": "2"}
    server = ServeProcess(tmp_path, "--index", redis_server.url, env=env).start()
    index = open_index(redis_server.url, config=IndexConfig(lease_ttl_s=2.0))
    try:
        chunk = _chunk("r", blocks=3)
        with Client(server.url) as client:
            client.put(chunk, b"y" * 2048)

        def held() -> int:
            match = index.lookup(list(chunk.block_keys)).matches.get("cache-r")
            return 0 if match is None else match.blocks

        # Another process (this test) sees the server's blocks through Redis.
        assert wait_until(lambda: held() == 3, timeout=20)
        assert index.lookup(list(chunk.block_keys)).matches["cache-r"].tiers == {"host": 3}
        # A server that dies stops counting once its lease runs out.
        server.kill()
        assert wait_until(lambda: held() == 0, timeout=20)
    finally:
        server.kill()
        index.close()


def test_unreachable_index_does_not_stop_the_server(tmp_path: Path) -> None:
    from tests.conftest import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = ServeProcess(tmp_path, "--index", dead).start()
    try:
        chunk = _chunk("d")
        with Client(server.url) as client:
            client.put(chunk, b"z" * 1024)
            got = client.get(chunk)
            assert got is not None and bytes(got.numpy()) == b"z" * 1024
    finally:
        server.kill()
