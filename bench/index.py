"""Benchmarks of the global block index, each against its floor measured in the same run.

- ``memory_lookup``: a 2,000-block prompt over 64 instances (mixed prefix lengths and tiers), in blocks
  checked per second (each block check answers for all 64 instances at once); ceiling: a bare walk of a
  dict of ints over the same keys and the same masks (``v = d.get(k); acc &= v``).
- ``redis_lookup_p50``: the same kind of lookup, 1,000 blocks over 16 instances, in one round trip (p50, ms);
  ceiling: a bare pipelined EXISTS of the same 1,000 keys (one round trip, no logic).
- ``memory_ingest`` / ``redis_ingest``: block events per second through ``add`` (batches of 256 blocks
  from 64 instances); ceilings: a bare dict update / a bare pipelined SET of the same keys.
- ``events_ingest_memory``: block events per second from a ZMQ PUB socket in vLLM's format through the
  ingester (decode, re-key from token ids with BLAKE2b, add); ceiling: msgpack decode of the same payloads.

Run: ``python bench/index.py`` (starts a private redis-server on a free port; skips the Redis cases if there
is none). One JSON object per line on stdout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import emit, log, median_time
from kvstrata.config import IndexConfig
from kvstrata.index.base import TIERS
from kvstrata.index.memory import MemoryBlockIndex

BENCH = "index"


def keys_of(n: int, salt: str) -> list[bytes]:
    return [hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=16).digest() for i in range(n)]


def populate(index: object, keys: list[bytes], instances: int, step: int) -> None:
    """Instance i holds the first ``len(keys) - i * step`` blocks, in tier i % 4 (and host for every 3rd)."""
    for i in range(instances):
        depth = max(1, len(keys) - i * step)
        index.add(f"engine-{i}", TIERS[i % 4], keys[:depth])  # type: ignore[attr-defined]
        if i % 3 == 0:
            index.add(f"engine-{i}", "host", keys[: depth // 2])  # type: ignore[attr-defined]


def bench_memory_lookup() -> None:
    keys = keys_of(2000, "mem")
    index = MemoryBlockIndex(config=IndexConfig(lease_ttl_s=3600.0, max_blocks=1_000_000))
    populate(index, keys, 64, 20)
    result = index.lookup(keys)
    assert len(result.matches) == 64 and result.matches["engine-0"].blocks == 2000
    t = median_time(lambda: index.lookup(keys), repeat=200, warmup=20)
    # the floor: the same keys and masks in a plain dict, walked with one AND per block
    masks = {k: index._young.get(k) or index._old.get(k) for k in keys}

    def walk() -> int:
        acc = -1
        get = masks.get
        for k in keys:
            v = get(k)
            if v is None:
                break
            acc &= v
        return acc

    c = median_time(walk, repeat=200, warmup=20)
    emit(
        BENCH,
        "memory_lookup_2000_blocks_64_instances",
        len(keys) / t / 1e6,
        "M blocks/s",
        len(keys) / c / 1e6,
        instance_checks_per_s=round(len(keys) * 64 / t / 1e6, 1),
        lookup_us=round(t * 1e6, 1),
    )


def bench_memory_ingest() -> None:
    index = MemoryBlockIndex(config=IndexConfig(lease_ttl_s=3600.0, max_blocks=4_000_000))
    batches = [(f"engine-{i % 64}", keys_of(256, f"ing{i}")) for i in range(400)]
    n = sum(len(b) for _, b in batches)
    start = time.perf_counter()
    for name, batch in batches:
        index.add(name, "host", batch)
    t = time.perf_counter() - start
    plain: dict[bytes, int] = {}
    start = time.perf_counter()
    for i, (_, batch) in enumerate(batches):
        bits = 1 << (i % 64) * 5
        get = plain.get
        for k in batch:
            plain[k] = get(k, 0) | bits
    c = time.perf_counter() - start
    emit(BENCH, "memory_ingest", n / t / 1e3, "k blocks/s", n / c / 1e3)


def bench_events_ingest() -> None:
    import msgspec
    import zmq

    from kvstrata.core.keys import Namespace
    from kvstrata.index.ingest import EngineEndpoint, EventIngester

    block_size, blocks_per_event, batches = 16, 32, 300
    payloads = []
    rng_tokens = list(range(50_000))
    for b in range(batches):
        tokens = rng_tokens[(b * 97) % 40_000 :][: block_size * blocks_per_event]
        hashes = [b * 1000 + i for i in range(blocks_per_event)]
        event = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": tokens,
            "block_size": block_size,
            "lora_id": None,
            "medium": "GPU",
        }
        payloads.append(msgspec.msgpack.encode([time.time(), [event], 0]))
    total = batches * blocks_per_event
    index = MemoryBlockIndex(config=IndexConfig(lease_ttl_s=3600.0))
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ingester = EventIngester(
        index, Namespace("bench", bytes(16)), [EngineEndpoint("e", f"tcp://127.0.0.1:{port}")]
    )
    # wait for the subscription (ZMQ drops what a PUB sends before it)
    seq = 0
    while ingester.stats.batches == 0:
        pub.send_multipart((b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode([0.0, [], 0])))
        seq += 1
        ingester.poll(10)
    stored_before = ingester.stats.blocks_stored

    def send() -> None:
        for i, payload in enumerate(payloads):
            pub.send_multipart((b"", (seq + i).to_bytes(8, "big"), payload))

    start = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    while ingester.stats.blocks_stored - stored_before < total:
        ingester.poll(100)
    t = time.perf_counter() - start
    sender.join()
    start = time.perf_counter()
    for payload in payloads:
        msgspec.msgpack.decode(payload)
    c = time.perf_counter() - start
    emit(
        BENCH,
        "events_ingest_memory",
        total / t / 1e3,
        "k blocks/s",
        total / c / 1e3,
        note="ceiling: msgpack decode only",
    )
    ingester.close()
    pub.close(0)
    ctx.term()


# -- Redis ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], int, str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="kvstrata-bench-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, workdir
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def bench_redis(port: int) -> None:
    import statistics

    import redis

    from kvstrata.index.base import open_index

    url = f"redis://127.0.0.1:{port}/0"
    config = IndexConfig(lease_ttl_s=3600.0, write_buffer=10_000_000)
    index = open_index(url, namespace="bench", config=config)
    keys = keys_of(1000, "redis")
    populate(index, keys, 16, 25)
    assert index.flush(60)
    result = index.lookup(keys)
    assert len(result.matches) == 16 and result.matches["engine-0"].blocks == 1000, result
    samples = []
    for _ in range(300):
        start = time.perf_counter()
        index.lookup(keys)
        samples.append(time.perf_counter() - start)
    p50 = statistics.median(samples[50:])
    raw = redis.Redis(port=port)
    names = [b"{kvs:bench}:b:" + k for k in keys]
    floor = []
    for _ in range(300):
        start = time.perf_counter()
        pipe = raw.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        pipe.execute()
        floor.append(time.perf_counter() - start)
    emit(
        BENCH,
        "redis_lookup_p50_1000_blocks_16_instances",
        p50 * 1e3,
        "ms",
        statistics.median(floor[50:]) * 1e3,
        round_trips=1,
        ceiling_is="pipelined EXISTS of the same keys",
    )

    # ingestion: 64 instances x 256-block batches through add(), until Redis has them all
    batches = [(f"ing-{i % 64}", keys_of(256, f"ring{i}")) for i in range(200)]
    n = sum(len(b) for _, b in batches)
    start = time.perf_counter()
    for name, batch in batches:
        index.add(name, "disk", batch)
    assert index.flush(120)
    t = time.perf_counter() - start
    start = time.perf_counter()
    pipe = raw.pipeline(transaction=False)
    for i, (_, batch) in enumerate(batches):
        for k in batch:
            pipe.set(b"{kvs:floor}:b:" + k, b"x" * 9)
        if i % 8 == 7:
            pipe.execute()
    pipe.execute()
    c = time.perf_counter() - start
    emit(
        BENCH,
        "redis_ingest",
        n / t / 1e3,
        "k blocks/s",
        n / c / 1e3,
        ceiling_is="pipelined SET of the same keys",
    )
    index.close()
    raw.close()


def main() -> None:
    log("index: memory lookup")
    bench_memory_lookup()
    log("index: memory ingest")
    bench_memory_ingest()
    log("index: KV events into memory")
    bench_events_ingest()
    started = start_redis()
    if started is None:
        log("index: no redis-server, Redis cases skipped")
        return
    proc, port, workdir = started
    try:
        log(f"index: redis on port {port}")
        bench_redis(port)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
