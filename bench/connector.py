"""Benchmarks of the vLLM connector on a real CPU engine: time to first token per placement of the KV, TTFT
against prompt length, decode throughput with saving on, and the scheduler's lookup latency.

Run: ``python bench/connector.py [--quick] [--lengths 512,1024,2048,4096,8192] [--reps 3]``.

The model is a random Llama (8 layers, hidden 1024, 16 heads, 8 KV heads, fp32; built here, nothing is
downloaded), the engine vLLM's CPU build in one process (the uni executor), block size 128, chunks of 256
tokens. Every case is an engine of its own, in a subprocess (this file again, ``--child``), started once;
inside it each prompt (fresh random ids, never seen by another case) is first computed once (the fill),
then timed:

- ``recompute``: no connector; the fill itself is the timed request (nothing cached).
- ``vllm_hit``: no connector; the same prompt again, from vLLM's own prefix cache (the floor: the KV never
  left the engine).
- ``embedded_host`` / ``embedded_disk``: kvstrata's Store inside the worker; the engine's prefix cache is
  reset between the fill and the timed request, so the prefix has to come back from kvstrata. For the
  disk case the host tier holds one chunk, so the others come from the disk tier, and their files are
  dropped from the page cache (fdatasync + POSIX_FADV_DONTNEED) before the timed request.
- ``shm_server`` / ``tcp_server``: a ``kvstrata serve`` process on this host, over kvs+shm:// or kvs://.
- ``example_connector``: vLLM's ExampleConnector (safetensors files per request), the same way.

TTFT is the wall time of ``LLM.generate`` of one prompt with ``max_tokens=1``; each case's timed request
also checks that its token equals the fill's and that the connector supplied the tokens it should
(vLLM's ``external_prefix_cache_hits``): a case that did not really hit is reported as such.

The ceiling of a TTFT is ``vllm_hit`` at the same length, measured in the same run (``ratio`` =
vllm_hit / case, so >= 1 would be as fast as the engine's own cache); ``vs_recompute`` is recompute / case.
Decode throughput runs 4 prompts of 512 tokens and 256 generated tokens each (so decode fills a chunk per
request, which the connector saves), with no connector as the ceiling. The scheduler's lookup latency is
measured on the scheduler half alone, with the catalog of a 32k-token prompt.

LMCache's connector (LMCacheConnectorV1) is not among the cases: see BENCHMARKS.md for why.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import emit, log

BENCH = "connector"
BLOCK = 128
CHUNK_TOKENS = 256
GIB = 1024**3
MODEL_SHAPE = {"num_layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 8, "vocab": 4096}
KV_BYTES_PER_TOKEN = 8 * 2 * 8 * 64 * 4  # layers x (K, V) x KV heads x head size x fp32

CONNECTOR_MODULE = "kvstrata.connector.vllm"


def kvstrata_transfer(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "kv_connector": "KVStrataConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


# -- the engine child --------------------------------------------------------------------------------


def _drop_page_cache(directory: str) -> int:
    """Write back and drop from the page cache every file under ``directory``; the files dropped."""
    dropped = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return dropped


def _counter(llm: Any, name: str) -> float:
    total = 0.0
    for metric in llm.get_metrics():
        if metric.name == name and hasattr(metric, "value"):
            total += float(metric.value)
    return total


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process and return its timings (see the module docstring)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kv_cache_gib"]))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    transfer = spec.get("kv_transfer_config")
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        enforce_eager=True,
        block_size=BLOCK,
        max_model_len=spec["max_model_len"],
        max_num_batched_tokens=spec["max_model_len"],
        distributed_executor_backend="uni",
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        kv_transfer_config=KVTransferConfig(**transfer) if transfer else None,
    )
    mode = spec["mode"]
    vocab = MODEL_SHAPE["vocab"]
    rng = random.Random(spec["seed"])

    def prompt(n: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(n)]

    def generate(prompts: list[list[int]], max_tokens: int = 1) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        took = time.perf_counter() - start
        return took, [list(o.outputs[0].token_ids) for o in outs]

    def settle() -> None:
        # Saves to servers are pushed in the background, demotions to disk too: let them land.
        time.sleep(spec.get("settle_s", 0.0))
        if spec.get("drop_dir"):
            _drop_page_cache(spec["drop_dir"])

    result: dict[str, Any] = {"mode": mode, "ttft": {}, "checks": []}
    if mode == "decode":
        generate([prompt(512) for _ in range(4)], 16)  # warm-up
        rates = []
        for _ in range(spec["reps"]):
            took, outs = generate([prompt(512) for _ in range(4)], 256)
            rates.append(sum(len(o) for o in outs) / took)
            settle()
        result["tokens_per_s"] = rates
        return result

    # Warm-up: the paths of the fill and of the timed request, on a prompt of its own.
    for n in sorted({min(512, max(spec["lengths"])), min(2048, max(spec["lengths"]))}):
        warm = prompt(n)
        generate([warm])
        settle()
        llm.reset_prefix_cache()
        generate([warm])
        llm.reset_prefix_cache()
    for length in spec["lengths"]:
        times = []
        for _ in range(spec["reps"]):
            p = prompt(length)
            took, first = generate([p])
            if mode == "recompute":
                times.append(took)
                llm.reset_prefix_cache()
                continue
            settle()
            if mode != "vllm_hit" and not llm.reset_prefix_cache():
                raise RuntimeError("the engine did not reset its prefix cache")
            before = _counter(llm, "vllm:external_prefix_cache_hits")
            took, second = generate([p])
            supplied = _counter(llm, "vllm:external_prefix_cache_hits") - before
            times.append(took)
            result["checks"].append(
                {"length": length, "same_token": first == second, "external_tokens": supplied}
            )
            llm.reset_prefix_cache()
        result["ttft"][str(length)] = times
    return result


# -- the driver --------------------------------------------------------------------------------------


def build_model(directory: Path, max_len: int) -> Path:
    from tests.connector.tiny_model import build_tiny_llama

    return build_tiny_llama(directory, max_pos=max_len, **MODEL_SHAPE)


class Server:
    """A ``kvstrata serve`` process for the server cases."""

    def __init__(self, host_cache: int, slot: int) -> None:
        from bench.transport import ServerProcess

        self._proc = ServerProcess(host_cache, slot, transports="tcp,shm")
        self.port = self._proc.port

    def close(self) -> None:
        self._proc.close()


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvstrata-bench-connector-") as tmp:
        spec_file, out_file = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(spec_file), "--out", str(out_file)]
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
        if proc.returncode != 0 or not out_file.exists():
            tail = proc.stdout.decode(errors="replace")[-4000:]
            raise RuntimeError(f"case {spec['mode']} failed (rc {proc.returncode}):\n{tail}")
        result: dict[str, Any] = json.loads(out_file.read_text())
        return result


def lookup_latency(num_tokens: int, repeat: int) -> tuple[float, float, float, float]:
    """(p50, p99) of the scheduler's get_num_new_matched_tokens for a fresh ``num_tokens`` prompt whose
    chunks the catalog holds (keys hashed on that call), then (p50, p99) of a repeated call."""
    from kvstrata.connector.metadata import TierChange, WorkerReport
    from kvstrata.connector.scheduler import SchedulerSide
    from kvstrata.connector.spec import EngineSpec, KeyChain

    spec = EngineSpec(
        model_id="bench", num_layers=8, num_kv_heads=8, head_size=64, dtype="float32", block_size=BLOCK,
        chunk_tokens=CHUNK_TOKENS, tp_size=1, engine_layout="cpu_packed",
    )  # fmt: skip
    side = SchedulerSide(spec)

    class Request:
        def __init__(self, rid: str, tokens: list[int]) -> None:
            self.request_id = rid
            self.all_token_ids = tokens
            self.num_tokens = len(tokens)
            self.lora_request = None
            self.cache_salt = None
            self.mm_features = None
            self.prompt_embeds = None

    rng = random.Random(1)
    first, again = [], []
    for i in range(repeat):
        tokens = [rng.randrange(4, 32000) for _ in range(num_tokens)]
        chain = KeyChain(spec)
        chain.extend(tokens, num_tokens // BLOCK)
        keys = tuple(chain.chunk_keys(c)[0] for c in range(num_tokens // CHUNK_TOKENS))
        side.apply_reports(
            [WorkerReport(rank=0, snapshot=i == 0, changes=(TierChange("stored", "host", keys),))]
        )
        request = Request(f"r{i}", tokens)
        start = time.perf_counter()
        got, _ = side.get_num_new_matched_tokens(request, 0)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        side.get_num_new_matched_tokens(request, 0)
        again.append(time.perf_counter() - start)
        if got != (num_tokens - 1) // CHUNK_TOKENS * CHUNK_TOKENS:
            raise RuntimeError(f"lookup found {got} tokens of {num_tokens}")
        side.request_finished(request)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    return pct(first, 0.5), pct(first, 0.99), pct(again, 0.5), pct(again, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only 2,048-token prompts")
    ap.add_argument("--cases", default="", help="comma-separated subset of the TTFT cases")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--model", default="", help="a model directory (else a random one is built)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(json.loads(Path(args.child).read_text()))
        Path(args.out).write_text(json.dumps(result))
        return

    lengths = [2048] if args.quick else [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + 2 * BLOCK
    p50, p99, again50, again99 = lookup_latency(32768, 200)
    emit(BENCH, "scheduler_lookup_32k_first", p50 * 1e3, "ms", p99_ms=round(p99 * 1e3, 4))
    emit(BENCH, "scheduler_lookup_32k_again", again50 * 1e3, "ms", p99_ms=round(again99 * 1e3, 4))

    # Room for every prompt of a case (the host tiers) and one prompt at a time (the engine).
    prompt_tokens = sum(lengths) * args.reps + 3000
    host_bytes = prompt_tokens * KV_BYTES_PER_TOKEN + GIB // 4
    kv_cache_gib = max(1, -(-(max_len * KV_BYTES_PER_TOKEN * 2) // GIB))
    # A stored chunk is its KV plus a 64-byte header: a server slot of exactly the KV's size is too small.
    chunk_bytes = CHUNK_TOKENS * KV_BYTES_PER_TOKEN + (1 << 20)
    work = Path(tempfile.mkdtemp(prefix="kvstrata-bench-connector-"))
    model = Path(args.model) if args.model else build_model(work / "model", max_len)
    server = Server(host_bytes, chunk_bytes)
    log(f"model {model}, lengths {lengths}, reps {args.reps}, server port {server.port}")
    store = {"host_cache_bytes": host_bytes, "disk_cache_bytes": 0}
    disk_dir = str(work / "disk")
    cases: dict[str, dict[str, Any]] = {
        "recompute": {},
        "vllm_hit": {},
        "embedded_host": {"kv_transfer_config": kvstrata_transfer({"store": store})},
        "embedded_disk": {
            "kv_transfer_config": kvstrata_transfer(
                {"store": {"host_cache_bytes": 1, "disk_cache_bytes": 64 * GIB, "disk_dir": disk_dir}}
            ),
            "settle_s": 1.0,
            "drop_dir": disk_dir,
        },
        "shm_server": {
            "kv_transfer_config": kvstrata_transfer(
                {"connector": {"servers": [f"kvs+shm://127.0.0.1:{server.port}"]}}
            ),
            "settle_s": 0.5,
        },
        "tcp_server": {
            "kv_transfer_config": kvstrata_transfer(
                {"connector": {"servers": [f"kvs://127.0.0.1:{server.port}"]}}
            ),
            "settle_s": 0.5,
        },
        "example_connector": {
            "kv_transfer_config": {
                "kv_connector": "ExampleConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": str(work / "example")},
            }
        },
    }
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = {k: v for k, v in cases.items() if k in wanted or k == "vllm_hit"}
    base = {"model": str(model), "max_model_len": max_len, "kv_cache_gib": kv_cache_gib, "reps": args.reps}
    results: dict[str, dict[str, Any]] = {}
    try:
        for seed, (name, extra) in enumerate(cases.items()):
            mode = name if name in ("recompute", "vllm_hit") else "hit"
            log(f"case {name}")
            started = time.perf_counter()
            spec = {**base, **extra, "mode": mode, "lengths": lengths, "seed": 1000 + seed}
            results[name] = run_child(spec, timeout=3600)
            log(f"case {name}: {time.perf_counter() - started:.0f} s")
        floor = {int(k): statistics.median(v) for k, v in results["vllm_hit"]["ttft"].items()}
        recompute = results.get("recompute", {}).get("ttft", {})
        for name, result in results.items():
            checks = result["checks"]
            for length_s, times in result["ttft"].items():
                length = int(length_s)
                median = statistics.median(times)
                mine = [c for c in checks if c["length"] == length]
                expected = (length - 1) // CHUNK_TOKENS * CHUNK_TOKENS
                extra_fields: dict[str, Any] = {"prompt_tokens": length, "reps": len(times)}
                if recompute.get(length_s):
                    extra_fields["vs_recompute"] = round(statistics.median(recompute[length_s]) / median, 3)
                if mine and name not in ("vllm_hit",):
                    extra_fields["same_token"] = all(c["same_token"] for c in mine)
                    extra_fields["external_tokens"] = min(c["external_tokens"] for c in mine)
                    extra_fields["expected_external"] = expected
                emit(BENCH, f"ttft_{length}_{name}", median, "s", floor[length], **extra_fields)
        if not args.no_decode:
            rates: dict[str, float] = {}
            for name in ("none", "embedded_host", "shm_server"):
                transfer = cases.get(name, {}).get("kv_transfer_config") if name != "none" else None
                if name != "none" and transfer is None:
                    continue
                spec = {**base, "mode": "decode", "seed": 77, "kv_transfer_config": transfer, "settle_s": 0.2}
                rates[name] = statistics.median(run_child(spec, timeout=1800)["tokens_per_s"])
            for name, rate in rates.items():
                if name != "none":
                    emit(BENCH, f"decode_saving_{name}", rate, "tokens/s", rates["none"])
    finally:
        server.close()


if __name__ == "__main__":
    main()
