"""kvstrata's tier events in vLLM's own KV-event stream, read back by kvstrata's own ingester.

A real vLLM engine runs with KV events on (``KVEventsConfig``: the zmq publisher, connecting to an
endpoint this test binds) and with KVStrataConnector over an embedded store (host tier, plus a disk tier
written through). vLLM publishes its GPU prefix-cache blocks itself; the connector's ``take_events`` adds
the chunks kvstrata stored, with their media ("CPU" for the host tier, "DISK"). An
:class:`~kvstrata.index.ingest.EventIngester` subscribes to that stream and feeds a memory
:class:`~kvstrata.index.memory.MemoryBlockIndex`, re-keyed in the connector's namespace, so a router's
lookup of a prompt's block keys names the engine and how deep each tier holds the prompt.

The checks run while the engine is paused between rounds (``--pause-dir``), so that nothing depends on
what vLLM's publisher still sends at shutdown.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstrata.connector.spec import KeyChain
from kvstrata.index.base import InstanceMatch
from kvstrata.index.ingest import EngineEndpoint, EventIngester, IngestStats
from kvstrata.index.memory import MemoryBlockIndex
from tests.conftest import free_port
from tests.connector.engine import make_prompts, run_engine
from tests.connector.tiny_model import tiny_spec
from tests.transport.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL_ID = "tiny-llama"
BLOCK = 128
CHUNK = 256
SPEC = tiny_spec(model_id=MODEL_ID, block_size=BLOCK, chunk_tokens=CHUNK)
#: 600 tokens: 4 full blocks, 2 chunks; 300: 2 blocks, 1 chunk; 400: 3 blocks but 1 chunk, so the GPU
#: (vLLM's blocks) and kvstrata's tiers (whole chunks) hold it to different depths.
PROMPTS = [
    make_prompts(512, 1, 600, seed=31)[0],
    make_prompts(512, 1, 300, seed=32)[0],
    make_prompts(512, 1, 400, seed=33)[0],
]
ROUND_DEADLINE_S = 20.0
ENGINE_TIMEOUT_S = 300.0


def block_keys(prompt: list[int]) -> list[bytes]:
    """kvstrata's key of every full block of ``prompt`` (what a router computes for a lookup)."""
    chain = KeyChain(SPEC)
    chain.extend(prompt, len(prompt) // BLOCK)
    return chain.keys[0]


def expected_tiers(prompt: list[int]) -> dict[str, int]:
    """How deep each tier holds ``prompt`` after it ran: the GPU every full block, kvstrata every full
    chunk (the last token's block is never cached; decoding 8 tokens fills no new block here)."""
    full_blocks = len(prompt) // BLOCK
    chunk_blocks = len(prompt) // CHUNK * SPEC.blocks_per_chunk
    return {"device": full_blocks, "host": chunk_blocks, "disk": chunk_blocks}


def kv_config(disk_dir: Path) -> dict[str, Any]:
    return {
        "kv_connector": "KVStrataConnector",
        "kv_connector_module_path": "kvstrata.connector.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "connector": {"model_id": MODEL_ID, "events": True},
            "store": {
                "disk_dir": str(disk_dir),
                "host_cache_bytes": 32 << 20,
                "slot_bytes": 1 << 20,
                "disk_cache_bytes": 64 << 20,
                "write_through": True,
            },
        },
    }


@dataclasses.dataclass
class Observed:
    """What an ingester's index said about the prompts at one pause, and its counters then."""

    matches: list[InstanceMatch | None]
    stats: IngestStats


@dataclasses.dataclass
class EventRun:
    result: dict[str, Any]
    log: str
    observed: list[Observed] = dataclasses.field(default_factory=list)


class Subscriber:
    """An EventIngester bound on free ports (vLLM connects its PUB socket and binds its replay ROUTER)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.port, self.replay_port = free_port(), free_port()
        self.index = MemoryBlockIndex()
        self.ingester = EventIngester(
            self.index,
            SPEC.namespaces[0],
            [
                EngineEndpoint(
                    instance,
                    f"tcp://127.0.0.1:{self.port}",
                    replay_endpoint=f"tcp://127.0.0.1:{self.replay_port}",
                    bind=True,
                )
            ],
        )
        self.ingester.start()

    def engine_args(self) -> list[str]:
        return [
            "--kv-events-endpoint",
            f"tcp://127.0.0.1:{self.port}",
            "--kv-events-replay-endpoint",
            f"tcp://127.0.0.1:{self.replay_port}",
        ]

    def match(self, prompt: list[int]) -> InstanceMatch | None:
        return self.index.lookup(block_keys(prompt)).matches.get(self.instance)

    def observe(self, want: list[dict[str, int]], timeout: float = 10.0) -> Observed:
        """Wait (events arrive asynchronously) until the prompts' matches have the tiers in ``want``, or
        the timeout; then what the index says."""

        def seen() -> list[InstanceMatch | None]:
            return [self.match(p) for p in PROMPTS]

        wait_until(
            lambda: all(m is not None and dict(m.tiers) == w for m, w in zip(seen(), want, strict=True)),
            timeout=timeout,
            interval=0.1,
        )
        return Observed(seen(), dataclasses.replace(self.ingester.stats))

    def close(self) -> None:
        self.ingester.close()
        self.index.close()


def paused_run(
    model: Path,
    out: Path,
    subscriber: Subscriber,
    prompts: list[list[int]],
    rounds: int,
    on_pause: Any,
    kv: dict[str, Any],
) -> EventRun:
    """Run the engine for ``rounds`` rounds; before each later round, ``on_pause(round)`` -> Observed."""
    pause_dir = out.with_suffix(".pause")
    pause_dir.mkdir()
    args = [
        "--rounds",
        str(rounds),
        "--reset-prefix-cache",
        "--pause-dir",
        str(pause_dir),
        "--round-timeout",
        str(ROUND_DEADLINE_S),
        *subscriber.engine_args(),
    ]
    observed: list[Observed] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            run_engine, model, out, *args, kv_transfer_config=kv, prompts=prompts, timeout=ENGINE_TIMEOUT_S
        )
        try:
            for rnd in range(1, rounds):
                deadline = time.monotonic() + ENGINE_TIMEOUT_S
                while not (pause_dir / f"ready-{rnd}").exists():
                    if future.done():
                        future.result()
                        raise AssertionError(f"the engine ended before round {rnd}")
                    assert time.monotonic() < deadline, f"the engine never reached round {rnd}"
                    time.sleep(0.05)
                observed.append(on_pause(rnd))
                (pause_dir / f"go-{rnd}").touch()
        finally:
            for rnd in range(1, rounds):  # never leave the engine waiting
                (pause_dir / f"go-{rnd}").touch()
        result = future.result(timeout=ENGINE_TIMEOUT_S)
    return EventRun(result, out.with_suffix(".log").read_text(encoding="utf-8"), observed)


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EventRun]]:
    """Engine A runs PROMPTS three times (prefix cache reset in between), observed by its own ingester
    after rounds 0 and 1. Engine B then starts on A's disk directory, runs only PROMPTS[0] and is observed
    after that round by a fresh ingester."""
    tmp = tmp_path_factory.mktemp("events")
    kv = kv_config(tmp / "disk")
    want = [expected_tiers(p) for p in PROMPTS]
    first = Subscriber("engine-a")
    try:
        run_a = paused_run(tiny_model, tmp / "a.json", first, PROMPTS, 3, lambda rnd: first.observe(want), kv)
    finally:
        first.close()
    restarted = Subscriber("engine-b")
    # B served PROMPTS[0] (from the disk, so now in every tier); the others are on its disk only.
    want_b = [want[0], {"disk": want[1]["disk"]}, {"disk": want[2]["disk"]}]
    try:
        run_b = paused_run(
            tiny_model,
            tmp / "b.json",
            restarted,
            PROMPTS[:1],
            2,
            lambda rnd: restarted.observe(want_b, timeout=5.0),
            kv,
        )
    finally:
        restarted.close()
    yield {"a": run_a, "b": run_b}


def test_index_learns_the_engines_blocks_in_kvstrata_tiers(runs: dict[str, EventRun]) -> None:
    """After one round, a lookup of each prompt's block keys finds engine A, holding every full block on
    the GPU (vLLM's own BlockStored events, re-keyed from their token ids) and every full chunk in the
    host and disk tiers (the connector's events, media CPU and DISK, carrying kvstrata's keys)."""
    run = runs["a"]
    after_first = run.observed[0]
    for prompt, match in zip(PROMPTS, after_first.matches, strict=True):
        assert match is not None, "the index does not know that engine A holds the prompt"
        assert match.instance == "engine-a"
        assert dict(match.tiers) == expected_tiers(prompt), match
        assert match.blocks == len(prompt) // BLOCK
    stats = after_first.stats
    assert stats.unkeyable == 0 and stats.malformed == 0 and stats.lost == 0 and stats.errors == 0, stats
    assert stats.unknown_medium == 0, stats
    # kvstrata's chunks, host and disk, beside vLLM's blocks.
    kvstrata_blocks = sum(2 * expected_tiers(p)["host"] for p in PROMPTS)
    gpu_blocks = sum(expected_tiers(p)["device"] for p in PROMPTS)
    assert stats.blocks_stored == kvstrata_blocks + gpu_blocks, stats


def test_prefix_cache_reset_clears_only_the_gpu_entries(runs: dict[str, EventRun]) -> None:
    """Round 1 starts with reset_prefix_cache (vLLM sends AllBlocksCleared for its GPU cache): the index
    drops engine A's GPU entries but keeps its host and disk ones; the round loads from kvstrata, vLLM
    caches the loaded blocks again, and the index shows all three tiers again."""
    run = runs["a"]
    before, after = run.observed[0].stats, run.observed[1]
    gpu_blocks = sum(expected_tiers(p)["device"] for p in PROMPTS)
    assert after.stats.blocks_removed - before.blocks_removed == gpu_blocks, after.stats
    for prompt, match in zip(PROMPTS, after.matches, strict=True):
        assert match is not None and dict(match.tiers) == expected_tiers(prompt), match
    # Round 1 really loaded from kvstrata (not from the reset GPU cache).
    hits = run.result["rounds"][1]["metrics_delta"]["vllm:external_prefix_cache_hits"]
    assert hits == sum((len(p) - 1) // CHUNK * CHUNK for p in PROMPTS)


def test_restarted_engine_announces_what_its_disk_tier_holds(runs: dict[str, EventRun]) -> None:
    """Engine B starts on engine A's disk directory and serves PROMPTS[0] only: the index must learn that
    B holds every prompt on disk (its store's start-up catalog), not only the one it served."""
    matches = runs["b"].observed[0].matches
    served, *others = matches
    assert served is not None and served.tiers.get("disk") == expected_tiers(PROMPTS[0])["disk"], served
    for prompt, match in zip(PROMPTS[1:], others, strict=True):
        assert match is not None and match.tiers.get("disk") == expected_tiers(prompt)["disk"], match
