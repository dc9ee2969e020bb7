"""Faults under a real vLLM engine with KVStrataConnector: a cache server killed between rounds and in the
middle of a load, chunk files corrupted on disk, a server that is unreachable or black-holed from the start.

In every case the engine must keep serving, generate exactly the tokens an engine without kvstrata
generates (a fault is a miss or a recompute, never wrong KV), count the failure in the connector's stats
(what ``get_kv_connector_stats`` hands to vLLM, recorded per round by engine.py) and finish each round
well within the connector's deadlines.

Each fixture runs one engine for several rounds (module-scoped, so the tests that read it share it); the
engine's own prefix cache is reset before every round after the first, so any reuse comes from kvstrata.
``--pause-dir`` stops the engine between rounds while the test breaks something.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvstrata.client import Client
from kvstrata.connector.spec import KeyChain
from tests.conftest import free_port
from tests.connector.engine import make_prompts, run_engine
from tests.connector.tiny_model import tiny_spec
from tests.transport.faulty_transport import FaultyProxy
from tests.transport.servers import ServeProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL_ID = "tiny-llama"  # the connector's namespace names this, not the model's temporary path
BLOCK = 128
CHUNK = 256  # the connector's default chunk: 256 tokens, two blocks
#: The tiny model's KV geometry as the connector sees it (tests/connector/tiny_model.py, CPU build).
SPEC = tiny_spec(model_id=MODEL_ID, block_size=BLOCK, chunk_tokens=CHUNK)
#: Two chunks, one chunk, one chunk (and a partial block each, since a hit never covers the last token).
PROMPTS = [
    make_prompts(512, 1, 600, seed=21)[0],
    make_prompts(512, 1, 300, seed=22)[0],
    make_prompts(512, 1, 400, seed=23)[0],
]
CHUNKS = [(len(p) - 1) // CHUNK for p in PROMPTS]
FULL_HIT = sum(CHUNKS) * CHUNK
#: Far above a round on a loaded 2-core machine (~0.1-1.5 s), far below a hang (the engine's timeout).
ROUND_DEADLINE_S = 20.0
ENGINE_TIMEOUT_S = 300.0
#: Short client deadlines, so that a dead or silent server costs little and a hang shows.
CLIENT = {"timeout_s": 2.0, "connect_timeout_s": 1.0, "retry_backoff_s": 0.05}
#: Client timeouts far above the connector's deadlines (the black-hole test shows that those bound a step).
SILENT_CLIENT = {"timeout_s": 30.0, "connect_timeout_s": 15.0, "retry_backoff_s": 0.05}
#: A round past the deadline is a hang: the engine dumps its threads' stacks and exits (engine.py).
WATCHDOG = ("--round-timeout", str(ROUND_DEADLINE_S))


def chunk_keys(prompt: list[int]) -> list[bytes]:
    """The rank-0 key of each full chunk of ``prompt`` (what the connector saves and looks up)."""
    chain = KeyChain(SPEC)
    blocks = chain.extend(prompt, len(prompt) // BLOCK)
    return [chain.chunk_keys(c)[0] for c in range(blocks // SPEC.blocks_per_chunk)]


def connector(extra: dict[str, Any]) -> dict[str, Any]:
    """A kv_transfer_config for KVStrataConnector with ``extra`` as kvstrata's config sections."""
    sections = {**extra, "connector": {"model_id": MODEL_ID, **extra.get("connector", {})}}
    return {
        "kv_connector": "KVStrataConnector",
        "kv_connector_module_path": "kvstrata.connector.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": sections,
    }


def servers_config(url: str, client: dict[str, Any] = CLIENT) -> dict[str, Any]:
    return connector({"connector": {"servers": [url], "load_timeout_s": 2.0}, "client": client})


def stats(result: dict[str, Any], rnd: int) -> dict[str, float]:
    """The connector's counters of round ``rnd``."""
    out = result["rounds"][rnd]["kv_connector_stats"]
    assert out is not None, "the engine recorded no connector stats"
    return dict(out)


def delta(result: dict[str, Any], rnd: int, name: str) -> float:
    return float(result["rounds"][rnd]["metrics_delta"].get(name, 0.0))


def engine_log(result_path: Path) -> str:
    return result_path.with_suffix(".log").read_text(encoding="utf-8")


def assert_engine_namespace(log: str) -> None:
    """The engine keyed its chunks in SPEC's namespace (so chunk_keys() names its chunks)."""
    found = re.findall(r"namespace=([0-9a-f]+)", log)
    assert found and set(found) == {SPEC.namespaces[0].id.hex()}, found


def assert_outputs_and_deadlines(result: dict[str, Any], baseline: list[list[int]]) -> None:
    for rnd in result["rounds"]:
        assert rnd["output_token_ids"] == baseline, f"round {rnd['round']} generated other tokens"
        assert rnd["latency_s"] < ROUND_DEADLINE_S, f"round {rnd['round']} took {rnd['latency_s']:.1f} s"


def timed_run(model: Path, out: Path, *args: str, **kwargs: Any) -> dict[str, Any]:
    """run_engine, plus ``exit_s``: the engine process's wall time outside its start and its rounds, which
    is mostly its shutdown (engine.py's ``shutdown_s`` is not: ``del llm`` leaves that to the exit)."""
    start = time.monotonic()
    result = run_engine(model, out, *args, timeout=ENGINE_TIMEOUT_S, **kwargs)
    busy = result["import_s"] + result["engine_start_s"] + sum(r["latency_s"] for r in result["rounds"])
    result["exit_s"] = time.monotonic() - start - busy
    return result


class PausedEngine:
    """run_engine in a thread with ``--pause-dir``: the test acts between rounds, then lets it go on."""

    def __init__(self, model: Path, out: Path, *args: str, **kwargs: Any) -> None:
        self.dir = out.with_suffix(".pause")
        self.dir.mkdir()
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = self._pool.submit(
            run_engine,
            model,
            out,
            "--pause-dir",
            str(self.dir),
            *WATCHDOG,
            *args,
            timeout=ENGINE_TIMEOUT_S,
            **kwargs,
        )

    def wait_ready(self, rnd: int, timeout: float = ENGINE_TIMEOUT_S) -> None:
        """Wait until the engine is paused before round ``rnd`` (raises what the engine raised)."""
        deadline = time.monotonic() + timeout
        while not (self.dir / f"ready-{rnd}").exists():
            if self._future.done():
                self._future.result()
                raise AssertionError(f"the engine ended before round {rnd}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not reach round {rnd}")
            time.sleep(0.05)

    def go(self, rnd: int) -> None:
        (self.dir / f"go-{rnd}").touch()

    def finish(self) -> dict[str, Any]:
        """Let the remaining rounds run without pausing; the engine's result."""
        self.release()
        try:
            return self._future.result(timeout=ENGINE_TIMEOUT_S)
        finally:
            self._pool.shutdown(wait=True)

    def release(self) -> None:
        """Let every pause pass (also what a failing test does, so that the engine does not wait)."""
        for rnd in range(1, 64):
            self.go(rnd)


def wait_saved(server: ServeProcess, prompts: list[list[int]], timeout: float = 30.0) -> None:
    """Wait until the server holds every full chunk of ``prompts`` (the engine pushes in the background)."""
    keys = [key for prompt in prompts for key in chunk_keys(prompt)]
    with Client(server.url, timeout=5) as client:
        assert wait_until(lambda: all(client.exists(keys)), timeout=timeout), "the saves never landed"


@pytest.fixture(scope="module")
def baseline(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """What the engine generates for PROMPTS without kvstrata."""
    out = tmp_path_factory.mktemp("baseline") / "r.json"
    result = run_engine(tiny_model, out, "--rounds", "1", prompts=PROMPTS, timeout=ENGINE_TIMEOUT_S)
    tokens: list[list[int]] = result["rounds"][0]["output_token_ids"]
    assert len(tokens) == len(PROMPTS) and all(len(t) == 8 for t in tokens)
    return tokens


# -- a server killed between rounds ------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_between_rounds(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Five rounds on one server: 0 saves, 1 hits; kill -9 before 2; restarted (empty, same port) before 3;
    4 runs on the restarted server."""
    tmp = tmp_path_factory.mktemp("killed")
    server = ServeProcess(tmp).start()
    out = tmp / "r.json"
    engine = PausedEngine(
        tiny_model,
        out,
        "--rounds",
        "5",
        "--reset-prefix-cache",
        kv_transfer_config=servers_config(server.url),
        prompts=PROMPTS,
    )
    try:
        engine.wait_ready(1)
        wait_saved(server, PROMPTS)
        engine.go(1)
        engine.wait_ready(2)
        server.kill()  # SIGKILL: no goodbye on the open connections
        engine.go(2)
        engine.wait_ready(3)
        server.start()
        # Past the client's back-off (0.05 s, doubled by each failed connect, a handful in round 2), so
        # that round 3 reaches the server.
        time.sleep(2.0)
        engine.go(3)
        result = engine.finish()
    finally:
        engine.release()
        server.kill()
    return {"result": result, "log": engine_log(out)}


def test_server_killed_between_rounds(
    killed_between_rounds: dict[str, Any], baseline: list[list[int]]
) -> None:
    """kill -9 of the only cache server between rounds: the next rounds compute (lookups fail fast and are
    counted), the tokens never change, and the engine reaches the restarted server again."""
    result, log = killed_between_rounds["result"], killed_between_rounds["log"]
    assert_engine_namespace(log)
    assert_outputs_and_deadlines(result, baseline)
    n = len(PROMPTS)
    # Round 0 saved every full chunk; round 1 loaded all of it from the server.
    assert stats(result, 0)["saves_planned"] == sum(len(chunk_keys(p)) for p in PROMPTS)
    assert delta(result, 1, "vllm:external_prefix_cache_hits") == FULL_HIT
    assert stats(result, 1)["loaded_chunks"] == sum(CHUNKS)
    # Round 2: the server is dead: every lookup fails, nothing is offered, nothing is loaded.
    dead = stats(result, 2)
    assert dead.get("lookup_errors", 0) >= n, dead
    assert delta(result, 2, "vllm:external_prefix_cache_hits") == 0
    assert "loaded_chunks" not in dead and "load_errors" not in dead
    assert "kvstrata: lookup failed" in log
    # Round 3 reaches the restarted server: its lookups answer (a miss: it lost everything).
    back = stats(result, 3)
    assert back.get("lookup_errors", 0) == 0 and back.get("lookups", 0) >= n, back
    assert delta(result, 3, "vllm:external_prefix_cache_hits") == 0


def test_chunks_are_saved_again_after_the_server_lost_them(killed_between_rounds: dict[str, Any]) -> None:
    """After the restarted (empty) server answered round 3's lookups with a miss, round 3 saves the chunks
    again, so round 4 hits."""
    result = killed_between_rounds["result"]
    assert stats(result, 3).get("saves_planned", 0) == sum(len(chunk_keys(p)) for p in PROMPTS)
    assert delta(result, 4, "vllm:external_prefix_cache_hits") == FULL_HIT


# -- a server killed while a load streams ------------------------------------------------------------


class KillingProxy(FaultyProxy):
    """A FaultyProxy whose armed drop also kills the server (SIGKILL) at that byte: the client's reply is
    cut mid-payload and its retry on a fresh connection finds the server dead, as when the server dies."""

    def __init__(self, server: ServeProcess) -> None:
        super().__init__(server.port)
        self.server = server

    def _apply(self, data: bytes, down: bool) -> tuple[bytes, bool]:
        out, close_after = super()._apply(data, down)
        if close_after:
            self.server.kill()
        return out, close_after


@pytest.fixture(scope="module")
def killed_mid_load(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three rounds through a KillingProxy: 0 saves; in 1 the server dies 128 KiB into the first chunk it
    sends (after the lookups, which answer in a few hundred bytes); 2 runs with the server dead."""
    tmp = tmp_path_factory.mktemp("midload")
    server = ServeProcess(tmp).start()
    proxy = KillingProxy(server)
    out = tmp / "r.json"
    engine = PausedEngine(
        tiny_model,
        out,
        "--rounds",
        "3",
        "--reset-prefix-cache",
        kv_transfer_config=servers_config(proxy.url()),
        prompts=PROMPTS,
    )
    result: dict[str, Any] | None = None
    error = None
    try:
        engine.wait_ready(1)
        wait_saved(server, PROMPTS)
        proxy.drop_after(128 * 1024)  # armed while the engine is idle: offsets count from here
        engine.go(1)
        try:
            result = engine.finish()
        except RuntimeError as exc:  # the watchdog ended a hung round: the test says so
            error = str(exc)
        fired = proxy.fired("drop")
    finally:
        engine.release()
        proxy.close()
        server.kill()
    return {"result": result, "error": error, "log": engine_log(out), "fired": fired}


def test_server_killed_during_a_load(killed_mid_load: dict[str, Any], baseline: list[list[int]]) -> None:
    """The server dies while a chunk streams to the engine: the load fails, its blocks are reported as load
    errors (vLLM recomputes them, kv_load_failure_policy "recompute"), the tokens never change, no round
    waits past the load deadline, and the round after runs without the server."""
    assert killed_mid_load["fired"], "the fault never fired: no load went through the proxy"
    error = killed_mid_load["error"]
    assert error is None, f"the engine did not finish (a watchdog 'Timeout' is a hang):\n{error[-3000:]}"
    result, log = killed_mid_load["result"], killed_mid_load["log"]
    assert_outputs_and_deadlines(result, baseline)
    # Round 1: everything was offered (the lookups answered before the kill), nothing arrived whole.
    hit = stats(result, 1)
    assert hit["hit_tokens"] == FULL_HIT, hit
    assert hit.get("loaded_chunks", 0) == 0, hit
    assert hit.get("load_errors", 0) >= 1 and hit.get("missing_chunks", 0) >= 1, hit
    assert "kvstrata: load from" in log and "failed" in log
    # vLLM got every loaded block as a load error and recomputed all of them.
    assert f"Recovered from KV load failure: {len(PROMPTS)} request(s) rescheduled ({FULL_HIT} tokens" in log
    # Round 2: the server is gone, every lookup fails fast, nothing is offered.
    after = stats(result, 2)
    assert after.get("lookup_errors", 0) >= len(PROMPTS), after
    assert after.get("hit_tokens", 0) == 0


# -- chunks corrupted on disk --------------------------------------------------------------------------


def embedded_config(disk_dir: Path) -> dict[str, Any]:
    """An embedded store whose every chunk is also written to the disk tier at once (write-through)."""
    return connector(
        {
            "store": {
                "disk_dir": str(disk_dir),
                "host_cache_bytes": 32 << 20,
                "slot_bytes": 1 << 20,
                "disk_cache_bytes": 64 << 20,
                "write_through": True,
            }
        }
    )


def chunk_file(disk_dir: Path, key: bytes) -> Path:
    """Where the disk tier of rank 0 keeps chunk ``key`` (kvstrata/kvstore/disk.py)."""
    return disk_dir / f"vllm-tp0-of-{SPEC.tp_size}" / key[:1].hex() / f"{key.hex()}.kvc"


def flip(path: Path, offset: int) -> None:
    """Invert one byte of the file (a negative offset counts from its end)."""
    with open(path, "r+b") as f:
        f.seek(offset, 0 if offset >= 0 else 2)
        pos = f.tell()
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))


@dataclass
class CorruptRun:
    result: dict[str, Any]
    log: str
    files: list[list[Path]]


@pytest.fixture(scope="module")
def corrupt_disk(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> CorruptRun:
    """An engine saves PROMPTS (host and disk tiers) and exits; then the payload of prompt 0's second chunk
    and the header of prompt 2's chunk are corrupted; a new engine on the same disk directory runs PROMPTS
    twice (prefix cache reset in between)."""
    tmp = tmp_path_factory.mktemp("corrupt")
    disk_dir = tmp / "disk"
    kv = embedded_config(disk_dir)
    first = run_engine(
        tiny_model, tmp / "save.json", "--rounds", "1", *WATCHDOG, kv_transfer_config=kv, prompts=PROMPTS
    )
    assert_engine_namespace(engine_log(tmp / "save.json"))
    assert stats(first, 0)["save_calls"] == sum(len(chunk_keys(p)) for p in PROMPTS)
    files = [[chunk_file(disk_dir, key) for key in chunk_keys(p)] for p in PROMPTS]
    assert all(f.is_file() for prompt_files in files for f in prompt_files), "write-through left no file"
    flip(files[0][1], -1000)  # in the payload: only a read's checksum can tell
    flip(files[2][0], 20)  # in the header's key field: recovery at start-up drops the file
    out = tmp / "r.json"
    result = run_engine(
        tiny_model,
        out,
        "--rounds",
        "2",
        "--reset-prefix-cache",
        *WATCHDOG,
        kv_transfer_config=kv,
        prompts=PROMPTS,
        timeout=ENGINE_TIMEOUT_S,
    )
    return CorruptRun(result, engine_log(out), files)


def test_corrupt_chunks_on_disk_are_never_loaded(corrupt_disk: CorruptRun, baseline: list[list[int]]) -> None:
    """A restarted engine finds its chunks on disk: the intact ones load, the one whose payload is corrupt
    fails its checksum and is recomputed (a load error from that chunk on), the one whose header is corrupt
    was dropped at start-up (a plain miss); the tokens never change."""
    result, log = corrupt_disk.result, corrupt_disk.log
    assert_outputs_and_deadlines(result, baseline)
    first = stats(result, 0)
    # Offered: prompt 0 (both chunks, one of them corrupt) and prompt 1; prompt 2's chunk is gone.
    assert first["hit_tokens"] == (CHUNKS[0] + CHUNKS[1]) * CHUNK, first
    assert first.get("hit_tokens_disk", 0) == first["hit_tokens"], first
    # Loaded: prompt 0's first chunk and prompt 1's; prompt 0's second chunk failed its checksum.
    assert first["loaded_chunks"] == 2, first
    assert first["missing_chunks"] == 1, first
    # The disk tier named both files: the header at start-up, the payload when the load read it.
    assert f"dropping unreadable chunk file {corrupt_disk.files[2][0]}: header checksum mismatch" in log
    assert f"{corrupt_disk.files[0][1]} failed its checksum; dropped" in log
    # vLLM got the corrupt chunk's blocks as load errors and recomputed exactly them.
    assert "Recovered from KV load failure: 1 request(s) rescheduled (256 tokens affected)" in log
    # Round 1: prompt 2, recomputed and saved in round 0, hits as well.
    assert result["rounds"][1]["num_cached_tokens"][2] == CHUNKS[2] * CHUNK
    assert stats(result, 1).get("missing_chunks", 0) == 0


# -- a server that cannot be reached from the start ----------------------------------------------------


@pytest.fixture(scope="module")
def unreachable(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two rounds with ``connector.servers`` naming a port nothing listens on."""
    tmp = tmp_path_factory.mktemp("unreachable")
    out = tmp / "r.json"
    url = f"kvs://127.0.0.1:{free_port()}"
    result = timed_run(
        tiny_model,
        out,
        "--rounds",
        "2",
        "--reset-prefix-cache",
        *WATCHDOG,
        kv_transfer_config=servers_config(url),
        prompts=PROMPTS,
    )
    return {"result": result, "log": engine_log(out)}


def test_server_unreachable_at_start(unreachable: dict[str, Any], baseline: list[list[int]]) -> None:
    """Nothing listens on the configured server's port: the engine starts, serves every round with the
    same tokens, counts the failed lookups and saves, and no step waits on the dead address."""
    result, log = unreachable["result"], unreachable["log"]
    assert_outputs_and_deadlines(result, baseline)
    assert result["engine_start_s"] < ROUND_DEADLINE_S
    for rnd in range(2):
        counters = stats(result, rnd)
        assert counters.get("lookup_errors", 0) + counters.get("lookup_timeouts", 0) >= len(PROMPTS)
        assert counters.get("hit_tokens", 0) == 0
        assert delta(result, rnd, "vllm:external_prefix_cache_hits") == 0
    total = result["kv_connector_stats_total"]
    assert total.get("save_errors", 0) >= 1 or total.get("saves_dropped", 0) >= 1, total
    assert "kvstrata: lookup failed" in log
    assert result["exit_s"] < ROUND_DEADLINE_S, result["exit_s"]


@pytest.fixture(scope="module")
def black_hole(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two rounds with the server behind a stalled proxy: connections are accepted, nothing is answered."""
    tmp = tmp_path_factory.mktemp("blackhole")
    server = ServeProcess(tmp).start()
    proxy = FaultyProxy(server.port)
    proxy.stall()
    out = tmp / "r.json"
    try:
        result = timed_run(
            tiny_model,
            out,
            "--rounds",
            "2",
            "--reset-prefix-cache",
            *WATCHDOG,
            # Client deadlines far above the connector's lookup deadline (0.5 s): only that one may
            # bound what a request waits.
            kv_transfer_config=servers_config(proxy.url(), SILENT_CLIENT),
            prompts=PROMPTS,
        )
        yield {"result": result, "log": engine_log(out)}
    finally:
        proxy.close()
        server.kill()


def test_silent_server_costs_at_most_the_lookup_deadline(
    black_hole: dict[str, Any], baseline: list[list[int]]
) -> None:
    """A server that accepts connections and never answers (a hung host): each lookup gives up at the
    connector's lookup deadline (0.5 s), long before the client's own timeouts (15 s to connect, 30 s a
    call), and the request computes; saves fail in the background without holding up a step."""
    result, log = black_hole["result"], black_hole["log"]
    assert_outputs_and_deadlines(result, baseline)
    for rnd in range(2):
        counters = stats(result, rnd)
        failed = counters.get("lookup_errors", 0) + counters.get("lookup_timeouts", 0)
        assert failed >= len(PROMPTS), counters
        assert counters.get("hit_tokens", 0) == 0
        # Well under one client connect timeout: nothing waited on the silent server but the deadline.
        assert result["rounds"][rnd]["latency_s"] < SILENT_CLIENT["connect_timeout_s"] / 2
    # Given up at 0.5 s by the scheduler half's deadline or by the same deadline passed to the client,
    # whichever fired first.
    assert "kvstrata: a lookup took over 0.500 s" in log or "request timed out); the request computes" in log
    # The save thread may still be stuck in a 15 s connect at exit: the exit must not wait for it.
    assert result["exit_s"] < SILENT_CLIENT["connect_timeout_s"], result["exit_s"]
