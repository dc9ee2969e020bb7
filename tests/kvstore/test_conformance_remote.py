"""RemoteTier passes the shared Tier conformance suite against a real kvs server (one per test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstrata.client import Client
from kvstrata.kvstore.remote import RemoteTier
from kvstrata.kvstore.tier import Tier
from tests.kvstore.conformance_tier import TierConformance, chunk_key
from tests.transport.servers import InProcessServer


class TestRemoteTierConformance(TierConformance):
    chunk_bytes = 4096

    @pytest.fixture(autouse=True)
    def _server(self) -> Iterator[None]:
        with InProcessServer(capacity=8 << 20, slot=64 << 10) as server:
            self.server = server
            self.client = Client(server.url, timeout=10)
            yield
            self.client.close()

    def make_tier(self, capacity_bytes: int) -> Tier:
        return RemoteTier(self.client, capacity_bytes)


def test_chunks_put_by_another_instance_are_found() -> None:
    with InProcessServer(capacity=8 << 20, slot=64 << 10) as server:
        first = RemoteTier(server.url, 1 << 20)
        second = RemoteTier(server.url, 1 << 20)
        try:
            key = chunk_key(1)
            first.put(key, b"x" * 100)
            assert second.contains(key)
            got = second.get(key)
            assert got is not None and bytes(got.numpy()) == b"x" * 100
        finally:
            first.close()
            second.close()


def test_server_down_is_a_tier_io_error() -> None:
    from kvstrata.errors import TierIOError

    server = InProcessServer(capacity=8 << 20, slot=64 << 10).start()
    tier = RemoteTier(Client(server.url, timeout=2, retry_backoff=0.01), 1 << 20)
    key = chunk_key(2)
    tier.put(key, b"y" * 10)
    server.stop()
    with pytest.raises(TierIOError):
        tier.get(key)
    with pytest.raises(TierIOError):
        tier.put(chunk_key(3), b"z" * 10)
    assert tier.snapshot().errors >= 2
    assert tier.contains(key), "the catalog still answers"
    tier.close()
