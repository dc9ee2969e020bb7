"""Run a real vLLM CPU engine on token-id prompts and write what happened as JSON; meant as a subprocess.

    python -m tests.connector.engine --model DIR --out result.json \
        [--kv-transfer-config JSON] [--prompts-file F] [--block-size N] [--dtype float32] \
        [--num-gpu-blocks N] [--rounds 2] [--reset-prefix-cache] [--max-tokens 8] [--mp] \
        [--pause-dir DIR] [--round-timeout S] \
        [--kv-events-endpoint tcp://127.0.0.1:PORT [--kv-events-replay-endpoint E]]

Each round generates greedily (temperature 0, ``ignore_eos``) for every prompt; with
``--reset-prefix-cache`` the engine's own prefix cache is emptied before every round after the first, so
that any reuse in later rounds has to come from the KV connector. The JSON holds, per round, the output
token ids per prompt, the wall time of the round and each request's time to first token, and a snapshot
of ``llm.get_metrics()`` (cumulative counters; ``*_delta`` are per round) with
``vllm:prefix_cache_hits/queries`` and ``vllm:external_prefix_cache_hits/queries``, and the KV connector's
own stats of the round (``kv_connector_stats``: what its ``get_kv_connector_stats`` returned, as vLLM hands it
to its stat loggers, numbers summed, lists counted; ``kv_connector_stats_total`` for the whole run).

``--pause-dir DIR`` makes the engine stop between rounds so that a test can act on the world (kill a cache
server, arm a fault): before round ``r`` (r >= 1) it creates ``DIR/ready-<r>`` and waits until
``DIR/go-<r>`` exists (at most ``--pause-timeout`` seconds, then it fails). ``--kv-events-endpoint`` turns
on vLLM's KV-event publisher (``KVEventsConfig``, zmq) towards that endpoint. ``--round-timeout S``: a round
(one ``generate``) that takes longer than S seconds is a hang: the engine prints every thread's stack and
exits with status 1 at once (faulthandler), instead of running into the caller's timeout.

Layouts (the settings that work on vLLM 0.32's CPU build):

* default, in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``distributed_executor_backend="uni"``:
  the LLM front end, the EngineCore (scheduler) and the worker (model runner) share one process.
* ``--mp``: ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` and ``distributed_executor_backend="mp"``: the EngineCore
  runs in its own process (``EngineCore_DP0``) and the worker in another (``VllmWorker-0``, started by
  MultiprocExecutor), so the scheduler-side and worker-side connector instances live in different
  processes, as in production. (On CPU, ``"uni"`` with multiprocessing on is turned into ``"mp"`` anyway:
  vllm/platforms/cpu.py, ``check_and_update_config``.)

Prompts are token ids (no tokenizer involved): ``--prompts-file`` is a JSON list of lists of ints; without
it, ``--num-prompts`` prompts of ``--prompt-len`` random ids (seeded) are made from the model's vocabulary.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The metrics copied into the result, summed over label sets; ``*_by_source`` ones are kept per source as
#: ``name{source}``. All are cumulative counters; each round also gets the per-round delta.
METRIC_NAMES = (
    "vllm:prefix_cache_hits",
    "vllm:prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:prompt_tokens",
    "vllm:prompt_tokens_by_source",
    "vllm:prompt_tokens_cached_by_source",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:num_preemptions",
)

REPO_ROOT = Path(__file__).resolve().parents[2]


#: What a CPU engine here runs with unless the environment says otherwise: a 1 GiB KV cache space, and
#: nothing that reaches the network.
ENGINE_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for an engine subprocess that is not this module (e.g. vLLM's OpenAI server):
    this process's environment over ENGINE_ENV_DEFAULTS, then ``extra``."""
    return {**ENGINE_ENV_DEFAULTS, **os.environ, **(extra or {})}


def set_engine_env(mp: bool) -> None:
    """The environment a CPU engine needs; must run before vllm is imported (vllm.envs reads it lazily,
    but the platform and the engine client read it at construction)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if mp else "0"
    for name, value in ENGINE_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def make_prompts(vocab: int, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``num_prompts`` prompts of ``prompt_len`` random ids in [4, vocab) (0-3 are the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]


def metrics_snapshot(llm: Any) -> dict[str, float]:
    """``{name: value}`` for the counters in METRIC_NAMES (``name{source}`` for the by-source ones)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name not in METRIC_NAMES:
            continue
        value = getattr(m, "value", None)
        if value is None:
            continue
        key = f"{m.name}{{{m.labels['source']}}}" if "source" in m.labels else m.name
        out[key] = out.get(key, 0.0) + float(value)
    return out


class ConnectorStatsRecorder:
    """A stat logger that keeps the KV connector's stats (``SchedulerStats.kv_connector_stats``, the dict
    of the connector's ``get_kv_connector_stats``), since vLLM's own loggers only print them."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.total: dict[str, float] = {}

    def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
        data = getattr(scheduler_stats, "kv_connector_stats", None) or {}
        for name, value in data.items():
            amount = len(value) if isinstance(value, list) else value
            if isinstance(amount, (int, float)) and not isinstance(amount, bool):
                for out in (self.current, self.total):
                    out[name] = out.get(name, 0) + amount

    def take(self) -> dict[str, float]:
        out, self.current = self.current, {}
        return out

    # the rest of the stat-logger interface: nothing to do
    def log(self) -> None: ...
    def log_engine_initialized(self) -> None: ...
    def record_sleep_state(self, *args: Any, **kwargs: Any) -> None: ...
    def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None: ...


def attach_stats_recorder(llm: Any) -> ConnectorStatsRecorder | None:
    """Hook a :class:`ConnectorStatsRecorder` into the engine's stat loggers (None if it has none)."""
    manager = getattr(llm.llm_engine, "logger_manager", None)
    if manager is None:
        return None
    recorder = ConnectorStatsRecorder()
    manager.stat_loggers.append(recorder)
    return recorder


def pause(directory: Path, rnd: int, timeout: float) -> None:
    """Announce round ``rnd`` and wait for the go-ahead (see --pause-dir)."""
    (directory / f"ready-{rnd}").touch()
    go = directory / f"go-{rnd}"
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {go.name} after {timeout} s")
        time.sleep(0.02)


def build_llm(args: argparse.Namespace) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": str(args.model),
        "dtype": args.dtype,
        "enforce_eager": True,
        "disable_log_stats": False,
        "enable_prefix_caching": not args.no_prefix_caching,
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "distributed_executor_backend": "mp" if args.mp else "uni",
    }
    if args.block_size is not None:
        kwargs["block_size"] = args.block_size
    if args.num_gpu_blocks:
        kwargs["num_gpu_blocks_override"] = args.num_gpu_blocks
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_transfer_config:
        kwargs["kv_transfer_config"] = json.loads(args.kv_transfer_config)
    if args.kv_events_endpoint:
        from vllm.config import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=args.kv_events_endpoint,
            replay_endpoint=args.kv_events_replay_endpoint,
        )
    return LLM(**kwargs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_engine_env(args.mp)
    model_dir = Path(args.model)
    if args.prompts_file:
        prompts = json.loads(Path(args.prompts_file).read_text(encoding="utf-8"))
        if not (isinstance(prompts, list) and all(isinstance(p, list) for p in prompts)):
            raise SystemExit("--prompts-file must hold a JSON list of lists of token ids")
    else:
        vocab = int(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"])
        prompts = make_prompts(vocab, args.num_prompts, args.prompt_len, args.seed)

    t0 = time.perf_counter()
    import vllm  # timed apart: the import is a large share of a cold start
    from vllm import SamplingParams, TokensPrompt

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm = build_llm(args)
    t_start = time.perf_counter() - t1

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    token_prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
    rounds: list[dict[str, Any]] = []
    recorder = attach_stats_recorder(llm)
    before = metrics_snapshot(llm)
    reset_before = set(args.reset_before or ())
    if args.reset_prefix_cache:
        reset_before.update(range(1, args.rounds))
    for r in range(args.rounds):
        if args.pause_dir and r > 0:
            pause(Path(args.pause_dir), r, args.pause_timeout)
        reset = r in reset_before
        if reset and not llm.reset_prefix_cache():
            raise RuntimeError("reset_prefix_cache() failed")
        t = time.perf_counter()
        if args.round_timeout:
            faulthandler.dump_traceback_later(args.round_timeout, exit=True)
        outputs = llm.generate(token_prompts, params, use_tqdm=False)
        faulthandler.cancel_dump_traceback_later()
        wall = time.perf_counter() - t
        after = metrics_snapshot(llm)
        ttft = []
        for o in outputs:
            metrics = getattr(o, "metrics", None)
            ttft.append(getattr(metrics, "first_token_latency", None) if metrics is not None else None)
        rounds.append(
            {
                "round": r,
                "reset_before": reset,
                "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                "num_cached_tokens": [getattr(o, "num_cached_tokens", None) for o in outputs],
                "latency_s": wall,
                "ttft_s": ttft,
                "metrics": after,
                "metrics_delta": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
                "kv_connector_stats": recorder.take() if recorder is not None else None,
            }
        )
        before = after

    result: dict[str, Any] = {
        "model": str(model_dir),
        "mp": bool(args.mp),
        "kv_transfer_config": json.loads(args.kv_transfer_config) if args.kv_transfer_config else None,
        "vllm_version": vllm.__version__,
        "pid": os.getpid(),
        "import_s": t_import,
        "engine_start_s": t_start,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "prompt_lens": [len(p) for p in prompts],
        "rounds": rounds,
        "kv_connector_stats_total": recorder.total if recorder is not None else None,
    }
    t2 = time.perf_counter()
    del llm  # the engine (and, with --mp, its processes) shuts down here
    result["shutdown_s"] = time.perf_counter() - t2
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (see tests/connector/tiny_model.py)")
    p.add_argument("--out", required=True, help="where the JSON result goes")
    p.add_argument("--kv-transfer-config", default=None, help="KVTransferConfig as JSON")
    p.add_argument("--prompts-file", default=None, help="JSON list of lists of token ids")
    p.add_argument("--num-prompts", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--block-size", type=int, default=None, help="a multiple of 32 on CPU (default 128)")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=64,
        help="num_gpu_blocks_override (default 64: a small cache starts faster); 0: vLLM sizes it",
    )
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reset-prefix-cache", action="store_true", help="reset it before every later round")
    p.add_argument("--reset-before", type=int, nargs="*", help="reset it before these rounds only")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mp", action="store_true", help="EngineCore and worker in separate processes")
    p.add_argument("--pause-dir", default=None, help="wait for DIR/go-<r> before each round r >= 1")
    p.add_argument("--pause-timeout", type=float, default=120.0)
    p.add_argument("--round-timeout", type=float, default=0.0, help="a round past it dumps stacks, exits 1")
    p.add_argument("--kv-events-endpoint", default=None, help="publish vLLM's KV events (zmq) there")
    p.add_argument("--kv-events-replay-endpoint", default=None, help="vLLM's KV-event replay endpoint")
    return p.parse_args(argv)


def run_engine(
    model: str | Path,
    out: str | Path,
    *args: str,
    kv_transfer_config: dict[str, Any] | None = None,
    prompts: list[list[int]] | None = None,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run this module in a subprocess (so every engine gets a fresh process) and return its JSON result.

    ``args`` are extra command-line flags (``"--mp"``, ``"--rounds", "3"``...). Raises with the tail of the
    engine's output when it fails.
    """
    out = Path(out)
    cmd = [sys.executable, "-m", "tests.connector.engine", "--model", str(model), "--out", str(out)]
    if kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    if prompts is not None:
        prompts_file = out.with_suffix(".prompts.json")
        prompts_file.write_text(json.dumps(prompts), encoding="utf-8")
        cmd += ["--prompts-file", str(prompts_file)]
    cmd += list(args)
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    log = proc.stdout.decode(errors="replace")
    out.with_suffix(".log").write_text(log, encoding="utf-8")
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"engine exited with {proc.returncode}:\n{log[-6000:]}")
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(
        f"engine start {result['engine_start_s']:.2f} s (import {result['import_s']:.2f} s), "
        f"rounds {[round(r['latency_s'], 3) for r in result['rounds']]} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
