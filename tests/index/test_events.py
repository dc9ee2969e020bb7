"""KV-event ingestion from a real ZMQ publisher that speaks vLLM's wire format, into real indexes.

``VllmLikePublisher`` encodes with msgspec Structs declared exactly as vLLM's ``vllm.distributed.kv_events``
declares them (tagged structs; ``array_like`` for the older positional form), sends vLLM's three frames on
a PUB socket and serves vLLM's replay protocol on a ROUTER socket.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.config import IndexConfig
from kvstrata.core.keys import Namespace, block_keys
from kvstrata.errors import InvalidArgumentError
from kvstrata.index.base import BlockIndex, open_index
from kvstrata.index.event_format import decode_batch
from kvstrata.index.ingest import EngineEndpoint, EventIngester, parse_endpoint
from kvstrata.index.memory import MemoryBlockIndex
from tests.conftest import RedisServer, free_port
from tests.index.conformance_index import summary

NS = Namespace("test-model", bytes(range(16)))
BS = 4


# -- vLLM's event types, declared as vLLM declares them ------------------------------------------------
class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class MapBlockStored(MapEvent, tag="BlockStored"):
    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class MapBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[Any]
    medium: str | None
    group_idx: int | None = None


class MapAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class ArrayBlockStored(ArrayEvent, tag="BlockStored"):  # the older positional form, before "medium"
    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class ArrayBlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[Any]


class ArrayAllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


END_SEQ = (-1).to_bytes(8, "big", signed=True)


class VllmLikePublisher:
    """vLLM's ZmqEventPublisher protocol: PUB (topic, seq, payload) + ROUTER replay of buffered batches."""

    def __init__(self, endpoint: str, *, bind: bool, replay_endpoint: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if bind:
            self.pub.bind(endpoint)
        else:
            self.pub.connect(endpoint)
        self.router = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if replay_endpoint:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(replay_endpoint)
            # like vLLM's publisher thread, the replay socket is served beside publishing
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_requests: list[int] = []
        self.encoder = msgspec.msgpack.Encoder()

    def publish(self, events: list[Any], *, skip: bool = False) -> int:
        """Send one batch (``skip``: buffer it for replay but drop it on the wire: a gap)."""
        payload = self.encoder.encode(Batch(time.time(), events, 0))
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if not skip:
            self.pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))
        return seq

    def _serve(self) -> None:
        assert self.router is not None
        while not self.stop.is_set():
            if not self.router.poll(20):
                continue
            client, _, start = self.router.recv_multipart()
            self.replay_requests.append(int.from_bytes(start, "big"))
            for seq, payload in list(self.buffer):
                if seq >= int.from_bytes(start, "big"):
                    self.router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self.router.send_multipart((client, b"", END_SEQ, b""))

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.pub.close(0)
        if self.router is not None:
            self.router.close(0)
        self.ctx.term()


def engine_hash(tokens: list[int], parent: int | None) -> int:
    """A stand-in for the engine's own block hash (the ingester must not depend on it)."""
    data = repr((parent, tokens)).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[-8:], "big")


def stored_events(
    tokens: list[int], *, per_event: int, form: str = "map", medium: str | None = "GPU"
) -> list[Any]:
    """BlockStored events for the full blocks of ``tokens``, ``per_event`` blocks each, chained."""
    events = []
    parent = None
    n = len(tokens) // BS
    for start in range(0, n, per_event):
        hashes, block_tokens = [], []
        for b in range(start, min(n, start + per_event)):
            toks = tokens[b * BS : (b + 1) * BS]
            h = engine_hash(toks, parent if not hashes else hashes[-1])
            hashes.append(h)
            block_tokens += toks
        if form == "map":
            events.append(MapBlockStored(hashes, parent, block_tokens, BS, None, medium, None))
        else:
            events.append(ArrayBlockStored(hashes, parent, block_tokens, BS, None))
        parent = hashes[-1]
    return events


def hashes_of(events: list[Any]) -> list[Any]:
    return [h for e in events for h in e.block_hashes]


def pump(ingester: EventIngester, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; stats {ingester.stats}"
        ingester.poll(20)


def sync(pub: VllmLikePublisher, ingester: EventIngester) -> None:
    """Send empty batches until the subscription is up (ZMQ drops what a PUB sends before that)."""
    deadline = time.monotonic() + 5.0
    while ingester.stats.batches == 0:
        assert time.monotonic() < deadline
        pub.publish([])
        ingester.poll(20)


TOKENS = list(range(100, 132))  # 8 blocks of 4
KEYS = block_keys(NS, TOKENS, BS)


@pytest.fixture
def memory_index() -> Iterator[MemoryBlockIndex]:
    idx = MemoryBlockIndex(config=IndexConfig(lease_ttl_s=600.0))
    yield idx
    idx.close()


def make_pair(
    index: BlockIndex, *, replay: bool = False, engine_binds: bool = True
) -> tuple[VllmLikePublisher, EventIngester]:
    port = free_port()
    replay_ep = f"tcp://127.0.0.1:{free_port()}" if replay else None
    endpoint = f"tcp://127.0.0.1:{port}"
    if engine_binds:
        pub = VllmLikePublisher(endpoint, bind=True, replay_endpoint=replay_ep)
        spec = EngineEndpoint("engine-a", endpoint, replay_ep, bind=False)
        ingester = EventIngester(index, NS, [spec], replay_timeout_s=2.0)
    else:
        spec = EngineEndpoint("engine-a", endpoint, replay_ep, bind=True)
        ingester = EventIngester(index, NS, [spec], replay_timeout_s=2.0)
        pub = VllmLikePublisher(endpoint, bind=False, replay_endpoint=replay_ep)
    return pub, ingester


@pytest.mark.parametrize("form", ["map", "array"])
def test_stored_removed_cleared_in_both_encodings(memory_index: MemoryBlockIndex, form: str) -> None:
    pub, ingester = make_pair(memory_index, engine_binds=(form == "map"))
    try:
        sync(pub, ingester)
        events = stored_events(TOKENS, per_event=3, form=form)
        pub.publish(events)
        pump(ingester, lambda: ingester.stats.blocks_stored == 8)
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (8, {"device": 8})}
        hashes = hashes_of(events)
        removed: Any = (
            MapBlockRemoved([hashes[5]], "GPU") if form == "map" else ArrayBlockRemoved([hashes[5]])
        )
        pub.publish([removed])
        pump(ingester, lambda: ingester.stats.blocks_removed == 1)
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (5, {"device": 5})}
        cleared: Any = MapAllBlocksCleared() if form == "map" else ArrayAllBlocksCleared()
        pub.publish([cleared])
        pump(ingester, lambda: ingester.stats.blocks_removed == 8)
        assert memory_index.lookup(KEYS).matches == {}
        assert ingester.stats.malformed == 0 and ingester.stats.unkeyable == 0
    finally:
        ingester.close()
        pub.close()


def test_medium_maps_to_tiers_and_unknown_fields_are_ignored(memory_index: MemoryBlockIndex) -> None:
    pub, ingester = make_pair(memory_index)
    try:
        sync(pub, ingester)
        gpu = stored_events(TOKENS[:16], per_event=4)
        cpu = stored_events(TOKENS, per_event=8, medium="CPU")
        payload = msgspec.msgpack.encode(
            [
                time.time(),
                [
                    {**msgspec.to_builtins(gpu[0]), "some_future_field": [1, 2], "type": "BlockStored"},
                    {"type": "SomeFutureEvent", "x": 1},
                    msgspec.to_builtins(cpu[0]),
                    {
                        "type": "BlockStored",
                        "medium": "TAPE",
                        "block_hashes": [1],
                        "parent_block_hash": None,
                        "token_ids": [1, 2, 3, 4],
                        "block_size": 4,
                    },
                ],
                0,
                "a trailing element",
            ]
        )
        pub.pub.send_multipart((b"", pub.seq.to_bytes(8, "big"), payload))
        pub.seq += 1
        pump(ingester, lambda: ingester.stats.blocks_stored == 12)
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (8, {"device": 4, "host": 8})}
        assert ingester.stats.unknown_medium == 1
    finally:
        ingester.close()
        pub.close()


def test_gap_is_replayed_from_the_router_socket(memory_index: MemoryBlockIndex) -> None:
    pub, ingester = make_pair(memory_index, replay=True)
    try:
        sync(pub, ingester)
        events = stored_events(TOKENS, per_event=2)
        replayed = ingester.stats.replayed  # sync may have replayed an empty batch the PUB sent too early
        pub.publish(events[:1])
        first_lost = pub.publish(events[1:2], skip=True)  # lost on the wire, kept for replay
        pub.publish(events[2:3], skip=True)
        pub.publish(events[3:])
        pump(ingester, lambda: ingester.stats.blocks_stored == 8)
        assert pub.replay_requests[-1] == first_lost
        assert ingester.stats.gaps == 1
        assert ingester.stats.replayed - replayed == 2
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (8, {"device": 8})}
    finally:
        ingester.close()
        pub.close()


def test_gap_without_replay_is_counted_and_skipped(memory_index: MemoryBlockIndex) -> None:
    pub, ingester = make_pair(memory_index)
    try:
        sync(pub, ingester)
        events = stored_events(TOKENS, per_event=4)
        pub.publish(events[:1], skip=True)
        pub.publish(events[1:])
        pump(ingester, lambda: ingester.stats.unkeyable == 4)  # the second half's parent never arrived
        assert ingester.stats.gaps == 1 and ingester.stats.lost == 1
        assert memory_index.lookup(KEYS).matches == {}
    finally:
        ingester.close()
        pub.close()


def test_late_subscriber_replays_what_the_engine_still_buffers(memory_index: MemoryBlockIndex) -> None:
    port, replay_port = free_port(), free_port()
    endpoint, replay_ep = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"
    pub = VllmLikePublisher(endpoint, bind=True, replay_endpoint=replay_ep)
    events = stored_events(TOKENS, per_event=2)
    for event in events[:3]:
        pub.publish([event])  # nobody listens yet
    ingester = EventIngester(
        memory_index, NS, [parse_endpoint(f"{endpoint}?instance=engine-a&replay={replay_ep}")]
    )
    try:
        deadline = time.monotonic() + 5.0
        while ingester.stats.blocks_stored < 8:
            assert time.monotonic() < deadline, ingester.stats
            if pub.seq < 40:
                pub.publish(events[3:] if pub.seq == 3 else [])
            ingester.poll(20)
        assert pub.replay_requests[0] == 0
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (8, {"device": 8})}
    finally:
        ingester.close()
        pub.close()


def test_publisher_restart_clears_the_instance(memory_index: MemoryBlockIndex) -> None:
    pub, ingester = make_pair(memory_index, engine_binds=False)
    try:
        sync(pub, ingester)
        for _ in range(3):
            pub.publish([])
        pub.publish(stored_events(TOKENS, per_event=8))
        pump(ingester, lambda: ingester.stats.blocks_stored == 8)
        assert "engine-a" in memory_index.lookup(KEYS).matches
        restarts = ingester.stats.restarts
        pub.seq = 0  # a new engine process: sequence numbers start again
        other = list(range(500, 516))
        pub.publish(stored_events(other, per_event=4))
        pump(ingester, lambda: ingester.stats.restarts > restarts and ingester.stats.blocks_stored == 12)
        assert memory_index.lookup(KEYS).matches == {}
        assert summary(memory_index.lookup(block_keys(NS, other, BS))) == {"engine-a": (4, {"device": 4})}
    finally:
        ingester.close()
        pub.close()


def test_extra_keys_and_lora_are_part_of_the_key(memory_index: MemoryBlockIndex) -> None:
    pub, ingester = make_pair(memory_index)
    try:
        sync(pub, ingester)
        toks = TOKENS[:8]
        h0, h1 = engine_hash(toks[:4], None), engine_hash(toks[4:], 1)
        pub.publish(
            [MapBlockStored([h0, h1], None, toks, BS, None, "GPU", None, extra_keys=[("img-1", 7), None])]
        )
        lora = TOKENS[8:16]
        pub.publish([MapBlockStored([11, 12], None, lora, BS, 3, "GPU", "my-lora")])
        pump(ingester, lambda: ingester.stats.blocks_stored == 4)
        expected = block_keys(NS, toks, BS, block_extra_keys=[["img-1", 7], []])
        assert summary(memory_index.lookup(expected)) == {"engine-a": (2, {"device": 2})}
        assert memory_index.lookup(block_keys(NS, toks, BS)).matches == {}
        lora_keys = block_keys(NS, lora, BS, extra_keys=["my-lora"])
        assert summary(memory_index.lookup(lora_keys)) == {"engine-a": (2, {"device": 2})}
    finally:
        ingester.close()
        pub.close()


def test_bytes_block_hashes(memory_index: MemoryBlockIndex) -> None:
    pub, ingester = make_pair(memory_index)
    try:
        sync(pub, ingester)
        h = [hashlib.sha256(bytes([i])).digest() for i in range(8)]  # 32-byte hashes, as with int hashes off
        pub.publish([MapBlockStored(h[:4], None, TOKENS[:16], BS, None, None, None)])
        pub.publish([MapBlockStored(h[4:], h[3], TOKENS[16:], BS, None, None, None)])
        pub.publish([MapBlockRemoved([h[7]], None)])
        pump(ingester, lambda: ingester.stats.blocks_removed == 1)
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (7, {"device": 7})}
    finally:
        ingester.close()
        pub.close()


def test_ingest_into_redis(redis_server: RedisServer) -> None:
    index = open_index(redis_server.url, namespace=NS.id.hex(), config=IndexConfig(lease_ttl_s=600.0))
    pub, ingester = make_pair(index, replay=True)
    try:
        sync(pub, ingester)
        events = stored_events(TOKENS, per_event=2)
        pub.publish(events)
        pub.publish([MapBlockRemoved([hashes_of(events)[6]], "GPU")])
        pump(ingester, lambda: ingester.stats.blocks_removed == 1)
        assert index.flush()
        assert summary(index.lookup(KEYS)) == {"engine-a": (6, {"device": 6})}
        assert [i.instance for i in index.instances()] == ["engine-a"]
    finally:
        ingester.close()
        pub.close()
        index.close()


def test_parse_endpoint() -> None:
    spec = parse_endpoint("tcp://10.0.0.5:5557?instance=gpu-0&replay=tcp://10.0.0.5:5558&topic=kv&bind=1")
    assert spec == EngineEndpoint("gpu-0", "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558", "kv", True)
    assert parse_endpoint("tcp://h:1").instance == "h:1"
    with pytest.raises(InvalidArgumentError):
        parse_endpoint("http://h:1")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_fails_but_with_a_typed_error(data: bytes) -> None:
    try:
        batch = decode_batch(data)
    except InvalidArgumentError:
        return
    assert isinstance(batch.events, list)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(-(2**63), 2**64 - 1),
            st.text(max_size=5),
            st.binary(max_size=5),
            st.lists(st.one_of(st.integers(0, 2**40), st.text(max_size=3), st.none()), max_size=6),
            st.dictionaries(
                st.sampled_from(["type", "block_hashes", "token_ids", "block_size", "medium"]),
                st.one_of(
                    st.integers(0, 2**40), st.text(max_size=12), st.lists(st.integers(0, 2**40), max_size=4)
                ),
            ),
        ),
        max_size=5,
    )
)
def test_malformed_events_are_dropped_not_raised(events: list[Any]) -> None:
    batch = decode_batch(msgspec.msgpack.encode([1.0, events, 0]))
    assert len(batch.events) + batch.malformed <= len(events)


def test_encoded_with_vllms_own_classes(memory_index: MemoryBlockIndex) -> None:
    kv_events = pytest.importorskip(
        "vllm.distributed.kv_events",
        reason="vllm is not installed here: this optional check encodes with vLLM's own KVEventBatch classes",
    )
    pub, ingester = make_pair(memory_index)
    try:
        sync(pub, ingester)
        events = stored_events(TOKENS, per_event=8)
        e = events[0]
        native = kv_events.BlockStored(
            block_hashes=e.block_hashes,
            parent_block_hash=None,
            token_ids=e.token_ids,
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        payload = msgspec.msgpack.Encoder().encode(kv_events.KVEventBatch(ts=time.time(), events=[native]))
        pub.pub.send_multipart((b"", pub.seq.to_bytes(8, "big"), payload))
        pub.seq += 1
        pump(ingester, lambda: ingester.stats.blocks_stored == 8)
        assert summary(memory_index.lookup(KEYS)) == {"engine-a": (8, {"device": 8})}
    finally:
        ingester.close()
        pub.close()
