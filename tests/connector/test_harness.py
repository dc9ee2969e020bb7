"""The harness itself: a real vLLM CPU engine on the tiny model, without a connector and with vLLM's own
ExampleConnector, proving that the metrics and the reset-between-rounds method tell a connector hit apart
from the engine's own prefix cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.connector.engine import make_prompts, run_engine

pytestmark = pytest.mark.slow

BLOCK = 128  # the CPU build's default block size
PROMPT_LEN = 300  # two full blocks plus a partial one
#: vLLM caches full blocks only, and a hit never covers the last prompt token: 300 tokens -> 256.
HIT = (PROMPT_LEN - 1) // BLOCK * BLOCK


def _prompts(n: int = 2) -> list[list[int]]:
    return make_prompts(512, n, PROMPT_LEN, seed=1)


def _delta(result: dict, rnd: int, name: str) -> float:
    return float(result["rounds"][rnd]["metrics_delta"].get(name, 0.0))


def _tokens(result: dict) -> list[list[list[int]]]:
    return [r["output_token_ids"] for r in result["rounds"]]


def test_no_connector_prefix_cache_and_reset(tiny_model: Path, tmp_path: Path) -> None:
    """Round 1 hits the engine's own prefix cache, round 2 (after reset_prefix_cache) hits nothing."""
    prompts = _prompts()
    result = run_engine(
        tiny_model, tmp_path / "r.json", "--rounds", "3", "--reset-before", "2", prompts=prompts
    )
    assert result["block_size"] == BLOCK
    tokens = _tokens(result)
    assert all(len(t) == 8 for t in tokens[0])
    assert tokens[0] == tokens[1] == tokens[2]
    assert tokens[0][0] != tokens[0][1]  # different prompts, different continuations

    n = len(prompts)
    assert _delta(result, 0, "vllm:prefix_cache_hits") == 0
    assert _delta(result, 0, "vllm:prefix_cache_queries") == n * PROMPT_LEN
    assert _delta(result, 1, "vllm:prefix_cache_hits") == n * HIT
    assert _delta(result, 2, "vllm:prefix_cache_hits") == 0
    for rnd in range(3):
        assert _delta(result, rnd, "vllm:external_prefix_cache_queries") == 0
        assert _delta(result, rnd, "vllm:external_prefix_cache_hits") == 0
        assert _delta(result, rnd, "vllm:request_success") == n
    assert result["rounds"][1]["num_cached_tokens"] == [HIT] * n
    assert result["engine_start_s"] > 0


def test_example_connector_external_hits(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM's ExampleConnector saves each prompt's KV; after a reset the next round loads it (external
    hits, no local hits) and generates exactly the same tokens."""
    store = tmp_path / "store"
    store.mkdir()
    prompts = _prompts()
    kv = {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(store)},
    }
    result = run_engine(
        tiny_model, tmp_path / "r.json", "--reset-prefix-cache", kv_transfer_config=kv, prompts=prompts
    )
    n = len(prompts)
    tokens = _tokens(result)
    assert tokens[0] == tokens[1]

    assert _delta(result, 0, "vllm:external_prefix_cache_hits") == 0
    assert _delta(result, 0, "vllm:external_prefix_cache_queries") == n * PROMPT_LEN
    assert _delta(result, 1, "vllm:prefix_cache_hits") == 0
    assert _delta(result, 1, "vllm:external_prefix_cache_hits") == n * HIT
    assert _delta(result, 1, "vllm:external_prefix_cache_queries") == n * PROMPT_LEN
    assert result["rounds"][1]["num_cached_tokens"] == [HIT] * n
    # An uninstrumented connector's hits are labelled external_unspecified.
    assert _delta(result, 1, "vllm:prompt_tokens_cached_by_source{external_unspecified}") == n * HIT

    # One folder per prompt, one safetensors file per attention layer.
    folders = sorted(p for p in store.iterdir() if p.is_dir())
    assert len(folders) == n
    for folder in folders:
        assert sorted(f.name for f in folder.iterdir()) == [
            f"model.layers.{i}.self_attn.attn.safetensors" for i in range(2)
        ]


def _probe_kv(tmp_path: Path) -> tuple[dict, Path]:
    store = tmp_path / "store"
    store.mkdir()
    log = tmp_path / "probe.jsonl"
    kv = {
        "kv_connector": "ProbeConnector",
        "kv_connector_module_path": "tests.connector.probe_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(store), "probe_log": str(log)},
    }
    return kv, log


def _read_probe(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("mp", [False, True], ids=["inproc", "mp"])
def test_probe_connector_layout_and_processes(tiny_model: Path, tmp_path: Path, mp: bool) -> None:
    """A connector loaded by module path sees every hook; in-process both roles share the engine's process,
    with --mp the scheduler role runs in the EngineCore process and the worker role in a third process.
    Also pins the CPU KV layout that register_kv_caches receives."""
    kv, log = _probe_kv(tmp_path)
    args = ["--reset-prefix-cache", *(["--mp"] if mp else [])]
    result = run_engine(tiny_model, tmp_path / "r.json", *args, kv_transfer_config=kv, prompts=_prompts(1))
    tokens = _tokens(result)
    assert tokens[0] == tokens[1]
    assert _delta(result, 1, "vllm:external_prefix_cache_hits") == HIT

    calls = _read_probe(log)
    hooks = {(c["role"], c["hook"]) for c in calls}
    for hook in (
        "start_load_kv",
        "wait_for_layer_load",
        "save_kv_layer",
        "wait_for_save",
        "register_kv_caches",
    ):
        assert ("WORKER", hook) in hooks
    for hook in ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"):
        assert ("SCHEDULER", hook) in hooks
    assert ("SCHEDULER", "request_finished") in hooks
    assert ("SCHEDULER", "update_connector_output") in hooks

    pids = {role: {c["pid"] for c in calls if c["role"] == role} for role in ("SCHEDULER", "WORKER")}
    assert len(pids["SCHEDULER"]) == 1 and len(pids["WORKER"]) == 1
    (sched_pid,) = pids["SCHEDULER"]
    (worker_pid,) = pids["WORKER"]
    if mp:
        assert len({result["pid"], sched_pid, worker_pid}) == 3
    else:
        assert result["pid"] == sched_pid == worker_pid

    # CPU layout: per layer (num_blocks, num_kv_heads, block_size, 2 * head_size), contiguous, all layers
    # views of one buffer, layer-major.
    (reg,) = [c for c in calls if c["hook"] == "register_kv_caches"]
    assert reg["one_storage"]
    layers = reg["layers"]
    assert list(layers) == [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    layer_elems = 64 * 2 * BLOCK * 2 * 64
    for i, meta in enumerate(layers.values()):
        assert meta["shape"] == [64, 2, BLOCK, 128]
        assert meta["contiguous"] and meta["dtype"] == "torch.float32" and meta["device"] == "cpu"
        assert meta["storage_offset"] == i * layer_elems

    # Per-layer attention metadata on CPU; forward_context.attn_metadata is a dict keyed by layer name.
    saves = [c for c in calls if c["hook"] == "save_kv_layer" and "attn_metadata_type" in c]
    assert saves and saves[0]["attn_metadata_type"].endswith("cpu_attn.CPUAttentionMetadata")
    assert "slot_mapping" in saves[0]["attn_metadata_fields"]
    # Steps without a forward (the EngineCore's empty step that only delivers finished_req_ids, seen with
    # --mp) still call start_load_kv and wait_for_save, with attn_metadata None.
    loads = [c for c in calls if c["hook"] == "start_load_kv"]
    assert {c["attn_metadata_type"] for c in loads} <= {"dict", "NoneType"}
    assert sum(c["loads"] for c in loads) == 1
