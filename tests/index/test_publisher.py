"""kvstrata's own tier events, published in vLLM's format and read back by the ingester (and by msgspec)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Optional, Union

import msgspec
import pytest
import zmq

from kvstrata.config import IndexConfig
from kvstrata.core.chunk import ChunkMeta
from kvstrata.core.keys import Namespace, block_keys, chunk_keys
from kvstrata.index.base import InstanceMatch
from kvstrata.index.event_format import decode_batch, encode_events
from kvstrata.index.ingest import EngineEndpoint, EventIngester
from kvstrata.index.memory import MemoryBlockIndex
from kvstrata.index.publisher import TierEventPublisher
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.tier import TierEvent
from tests.conftest import free_port
from tests.index.conformance_index import summary

NS = Namespace("test-model", bytes(range(16)))
BS = 4
TOKENS = list(range(64))
KEYS = block_keys(NS, TOKENS, BS)  # 16 blocks
CHUNKS = chunk_keys(KEYS, 4)  # 4 chunks of 4 blocks


def pump(ingester: EventIngester, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; stats {ingester.stats}"
        ingester.poll(20)


@pytest.fixture
def index() -> Iterator[MemoryBlockIndex]:
    idx = MemoryBlockIndex(config=IndexConfig(lease_ttl_s=600.0))
    yield idx
    idx.close()


@pytest.fixture
def tier() -> Iterator[HostTier]:
    t = HostTier(capacity_bytes=16 * 1024, slot_bytes=1024, pin_memory=False)
    yield t
    t.close()


FAR = InstanceMatch("none", 0, {})


def put_chunk(tier: HostTier, i: int) -> None:
    chunk = CHUNKS[i]
    tier.put(chunk.digest, bytes(512), ChunkMeta(block_keys=chunk.block_keys, num_tokens=4 * BS))


def test_host_tier_events_reach_the_index_as_cpu_medium(index: MemoryBlockIndex, tier: HostTier) -> None:
    replay = f"tcp://127.0.0.1:{free_port()}"
    publisher = TierEventPublisher("tcp://127.0.0.1:*", replay_endpoint=replay, block_size=BS)
    publisher.attach(tier)
    put_chunk(tier, 0)  # before anyone subscribes: comes back through the replay socket
    assert publisher.flush()
    ingester = EventIngester(
        index, NS, [EngineEndpoint("engine-a", publisher.endpoint, publisher.replay_endpoint)]
    )
    try:
        deadline = time.monotonic() + 5.0
        i = 1
        while ingester.stats.blocks_stored < 16:
            assert time.monotonic() < deadline, ingester.stats
            if i < 4:
                put_chunk(tier, i)
                i += 1
            ingester.poll(50)
        assert summary(index.lookup(KEYS)) == {"engine-a": (16, {"host": 16})}
        tier.remove(CHUNKS[2].digest)
        pump(ingester, lambda: ingester.stats.blocks_removed == 4)
        assert summary(index.lookup(KEYS)) == {"engine-a": (8, {"host": 8})}
        tier.clear()
        pump(ingester, lambda: ingester.stats.blocks_removed == 16)
        assert index.lookup(KEYS).matches == {}
    finally:
        ingester.close()
        publisher.close()


def test_engine_and_kvstrata_streams_feed_one_instance(index: MemoryBlockIndex, tier: HostTier) -> None:
    """The engine's GPU events and kvstrata's host-tier events, two streams indexed as one instance."""
    replay = f"tcp://127.0.0.1:{free_port()}"
    kv_pub = TierEventPublisher("tcp://127.0.0.1:*", replay_endpoint=replay, block_size=BS)
    kv_pub.attach(tier)
    engine_ctx = zmq.Context()
    engine_pub = engine_ctx.socket(zmq.PUB)
    engine_port = engine_pub.bind_to_random_port("tcp://127.0.0.1")
    ingester = EventIngester(
        index,
        NS,
        [
            EngineEndpoint("node-1", f"tcp://127.0.0.1:{engine_port}"),
            EngineEndpoint("node-1", kv_pub.endpoint, kv_pub.replay_endpoint),
        ],
    )
    try:
        seq = 0
        expected = {"node-1": (16, {"device": 2, "host": 16})}
        deadline = time.monotonic() + 5.0
        while summary(index.lookup(KEYS)) != expected:
            assert time.monotonic() < deadline, (ingester.stats, summary(index.lookup(KEYS)))
            if "device" not in index.lookup(KEYS).matches.get("node-1", FAR).tiers:
                stored = {
                    "type": "BlockStored",
                    "block_hashes": [1, 2],
                    "parent_block_hash": None,
                    "token_ids": TOKENS[:8],
                    "block_size": BS,
                    "lora_id": None,
                    "medium": "GPU",
                }
                payload = msgspec.msgpack.encode([time.time(), [stored], 0])
                engine_pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))
                seq += 1
            if len(tier) < 4:
                put_chunk(tier, len(tier))
            ingester.poll(50)
        # a restart of the engine's stream forgets the engine's blocks, not kvstrata's
        engine_pub.send_multipart((b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode([time.time(), [], 0])))
        pump(ingester, lambda: ingester.stats.restarts >= 1)
        assert summary(index.lookup(KEYS)) == {"node-1": (16, {"host": 16})}
    finally:
        ingester.close()
        kv_pub.close()
        engine_pub.close(0)
        engine_ctx.term()


def _vllm_types(array_like: bool) -> tuple[type, ...]:
    """msgspec Structs declared as vLLM declares its events (positional when ``array_like``)."""

    class Event(msgspec.Struct, tag=True, array_like=array_like):
        pass

    class BlockStored(Event):
        block_hashes: list[bytes | int]
        parent_block_hash: bytes | int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class BlockRemoved(Event):
        block_hashes: list[bytes | int]
        medium: str | None

    class AllBlocksCleared(Event):
        pass

    # defstruct: string annotations (this module's __future__ import) cannot name the local classes
    Batch = msgspec.defstruct(
        "Batch",
        [
            ("ts", float),
            ("events", list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]),
            ("data_parallel_rank", Optional[int], None),
        ],
        array_like=True,
    )

    return Event, BlockStored, BlockRemoved, AllBlocksCleared, Batch


VLLM_TYPES = {"map": _vllm_types(False), "array": _vllm_types(True)}


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_encoding_is_vllm_compatible(encoding: str) -> None:
    """Decoded by msgspec Structs declared as vLLM declares its events, and by kvstrata's decoder."""

    _, BlockStored, BlockRemoved, AllBlocksCleared, Batch = VLLM_TYPES[encoding]
    events = [
        TierEvent("stored", "disk", (CHUNKS[0].digest,), CHUNKS[0].block_keys),
        TierEvent("removed", "remote", (CHUNKS[0].digest,), CHUNKS[0].block_keys),
        TierEvent("cleared", "host"),
    ]
    payload = encode_events(events, block_size=BS, encoding=encoding)  # type: ignore[arg-type]
    batch = msgspec.msgpack.decode(payload, type=Batch)
    stored, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.medium == "DISK"
    assert stored.block_hashes == list(CHUNKS[0].block_keys) and stored.block_size == BS
    assert isinstance(removed, BlockRemoved) and removed.medium == "REMOTE"
    assert isinstance(cleared, AllBlocksCleared)
    ours = decode_batch(payload)
    assert [type(e).__name__ for e in ours.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert ours.events[2].medium == "CPU"  # type: ignore[union-attr]
    # vLLM's int-hash mode: the low 64 bits, big-endian
    as_ints = msgspec.msgpack.decode(
        encode_events(events[:1], block_size=BS, int_hashes=True, encoding=encoding), type=Batch
    )
    first = as_ints.events[0]
    assert isinstance(first, BlockStored)
    assert first.block_hashes[0] == int.from_bytes(CHUNKS[0].block_keys[0][8:], "big")
