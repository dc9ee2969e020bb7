"""Drive LMCache's RemoteBackend against a running ``lmcache_server`` (run under LMCache's own venv).

This is the LMCache half of ``bench/lmcache_compare.py``; it imports only LMCache's public classes and is
executed as a subprocess by the Python interpreter of a separate virtualenv where ``lmcache`` is installed,
so kvstrata never imports LMCache. The path measured is the one LMCache's vLLM integration uses for a
remote ``lm://`` server: ``RemoteBackend.submit_put_task`` (asynchronous, on an asyncio loop thread) and
``RemoteBackend.get_blocking``, with the ``naive`` serde and chunks allocated from its ``LocalCPUBackend``.

Usage: ``python _lmcache_driver.py HOST PORT --sizes 262144,2097152 --chunks 64 --repeat 5``.
Prints one JSON object per chunk size on stdout:
``{"chunk_bytes", "chunks", "put_s", "get_s", "verified"}`` (best of ``repeat`` runs, seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.remote_backend import RemoteBackend

HEAD_SIZE = 128
KV_HEADS = 2
TOKENS = 256


def chunk_shape(num_bytes: int) -> torch.Size:
    """An LMCache KV_2LTD shape [2, layers, tokens, hidden] in fp16 of exactly ``num_bytes``."""
    per_layer = 2 * TOKENS * KV_HEADS * HEAD_SIZE * 2
    if num_bytes % per_layer:
        raise SystemExit(f"chunk size {num_bytes} is not a multiple of {per_layer}")
    return torch.Size((2, num_bytes // per_layer, TOKENS, KV_HEADS * HEAD_SIZE))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--sizes", default="262144,2097152")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    pool_gib = (max(sizes) * args.chunks * 3) / 1024**3 + 0.25
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=TOKENS,
        local_cpu=False,
        max_local_cpu_size=pool_gib,
        remote_url=f"lm://{args.host}:{args.port}",
        remote_serde="naive",
    )
    metadata = LMCacheMetadata(
        model_name="bench",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.float16,
        kv_shape=(1, 2, TOKENS, KV_HEADS, HEAD_SIZE),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cpu_backend = LocalCPUBackend(config, metadata)
    backend = RemoteBackend(config, metadata, loop, cpu_backend)

    for size in sizes:
        shape = chunk_shape(size)
        keys = [CacheEngineKey("bench", 1, 0, size * 1000 + i, torch.float16) for i in range(args.chunks)]
        objs = []
        for i in range(args.chunks):
            obj = cpu_backend.allocate(shape, torch.float16, MemoryFormat.KV_2LTD)
            assert obj is not None and obj.tensor is not None
            obj.tensor.reshape(-1).view(torch.uint8).fill_(i % 251)
            objs.append(obj)

        def put_all(keys: list[CacheEngineKey] = keys, objs: list = objs) -> None:
            futures = [backend.submit_put_task(k, o) for k, o in zip(keys, objs, strict=True)]
            for f in futures:
                f.result()
            # the server handles one connection's commands in order: one round trip after the last put
            # means every chunk has reached its store (a fair "put is done" point for the comparison)
            assert backend.contains(keys[-1])

        verified = True

        def get_all(keys: list[CacheEngineKey] = keys, size: int = size) -> None:
            nonlocal verified
            for i, k in enumerate(keys):
                got = backend.get_blocking(k)
                if got is None or got.tensor is None:
                    verified = False
                    continue
                view = got.tensor.reshape(-1).view(torch.uint8)
                if view.numel() != size or int(view[0]) != i % 251 or int(view[-1]) != i % 251:
                    verified = False
                got.ref_count_down()

        put_times, get_times = [], []
        put_all()
        get_all()
        for _ in range(args.repeat):
            start = time.perf_counter()
            put_all()
            put_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            get_all()
            get_times.append(time.perf_counter() - start)
        for obj in objs:
            obj.ref_count_down()
        print(
            json.dumps(
                {
                    "chunk_bytes": size,
                    "chunks": args.chunks,
                    "put_s": min(put_times),
                    "get_s": min(get_times),
                    "verified": verified,
                }
            ),
            flush=True,
        )
    backend.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    sys.stdout.flush()
    # LMCache leaves non-daemon threads behind; the measurements are printed, so leave at once
    os._exit(0)


if __name__ == "__main__":
    main()
