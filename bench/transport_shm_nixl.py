"""The shm and nixl cases of ``bench/transport.py`` (registered there through :data:`SHM_NIXL_CASES`).

Each case gets ``bench/transport.py``'s context (``ctx.server.port``, ``ctx.sizes``, ``ctx.chunks``,
``ctx.repeat``) and moves ``ctx.chunks`` chunks per size with one Client against the run's server:

- ``shm_put_<size>`` / ``shm_get_<size>``: ``put_many`` / ``get_many`` (into preallocated tensors) through
  ``kvs+shm://``; ceiling = ``torch.Tensor.copy_`` of the same chunks into / out of one warm pool in this
  process (``copy_put_<size>`` / ``copy_get_<size>``). Goal: ratio >= 0.7.
- ``nixl_put_<size>`` / ``nixl_get_<size>``: the same through ``kvs+nixl://`` (UCX DRAM to DRAM on a
  CPU-only machine); ceiling = the tcp transport (``kvs://``, checksums on) moving the same chunks in the
  same run, so the ratio is nixl / tcp.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from bench._common import best_time, emit, gib_per_s, log

__all__ = ["SHM_NIXL_CASES", "bench_nixl", "bench_shm"]

BENCH = "transport"


def _label(size: int) -> str:
    return f"{size // (1 << 20)}MiB" if size >= 1 << 20 else f"{size // 1024}KiB"


def _moves(ctx: Any, url: str, size: int, salt: str) -> tuple[float, float]:
    """GiB/s of put_many and get_many (into preallocated tensors) of ``ctx.chunks`` chunks through ``url``."""
    from kvstrata.client import Client

    keys = [hashlib.blake2b(f"{salt}{size}/{i}".encode(), digest_size=16).digest() for i in range(ctx.chunks)]
    data = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in keys]
    outs = [torch.ones(size, dtype=torch.uint8) for _ in keys]
    total = size * ctx.chunks
    got: list[torch.Tensor | None] = []
    with Client(url, timeout=60) as client:
        put = gib_per_s(total, best_time(lambda: client.put_many(keys, data), repeat=ctx.repeat))

        def get() -> None:
            got[:] = client.get_many(keys, outs)

        rate = gib_per_s(total, best_time(get, repeat=ctx.repeat))
    if any(g is None or not torch.equal(g, d) for g, d in zip(got, data, strict=True)):
        raise RuntimeError(f"{url}: wrong bytes came back at {_label(size)}")
    return put, rate


def _copy_ceiling(ctx: Any, size: int) -> tuple[float, float]:
    """GiB/s of ``torch.Tensor.copy_`` of the same chunks into and out of one preallocated pool."""
    srcs = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(ctx.chunks)]
    outs = [torch.ones(size, dtype=torch.uint8) for _ in range(ctx.chunks)]
    pool = torch.ones(size * ctx.chunks, dtype=torch.uint8)  # pages faulted in, like a warm host pool
    slots = [pool[i * size : (i + 1) * size] for i in range(ctx.chunks)]

    def put() -> None:
        for slot, src in zip(slots, srcs, strict=True):
            slot.copy_(src)

    def get() -> None:
        for out, slot in zip(outs, slots, strict=True):
            out.copy_(slot)

    total = size * ctx.chunks
    put_rate = gib_per_s(total, best_time(put, repeat=ctx.repeat))
    return put_rate, gib_per_s(total, best_time(get, repeat=ctx.repeat))


def bench_shm(ctx: Any) -> None:
    """The shm transport (``kvs+shm://``) against ``copy_`` of the same bytes (goal: ratio >= 0.7)."""
    for size in ctx.sizes:
        put_ceiling, get_ceiling = _copy_ceiling(ctx, size)
        put, get = _moves(ctx, f"kvs+shm://127.0.0.1:{ctx.server.port}", size, "shm")
        label = _label(size)
        emit(BENCH, f"copy_put_{label}", put_ceiling, "GiB/s")
        emit(BENCH, f"copy_get_{label}", get_ceiling, "GiB/s")
        emit(BENCH, f"shm_put_{label}", put, "GiB/s", put_ceiling)
        emit(BENCH, f"shm_get_{label}", get, "GiB/s", get_ceiling)


def bench_nixl(ctx: Any) -> None:
    """The nixl transport (``kvs+nixl://``) against the tcp transport moving the same chunks in this run.

    The NIXL agent lives in this process until it exits (NIXL's teardown at exit has been seen to crash,
    after every figure has been printed).
    """
    try:
        import nixl  # noqa: F401
    except ImportError:
        log("nixl is not installed (pip install kvstrata[nixl]): skipping the nixl cases")
        return
    for size in ctx.sizes:
        tcp_put, tcp_get = _moves(ctx, f"kvs://127.0.0.1:{ctx.server.port}", size, "nixl-tcp")
        put, get = _moves(ctx, f"kvs+nixl://127.0.0.1:{ctx.server.port}", size, "nixl")
        label = _label(size)
        emit(BENCH, f"nixl_put_{label}", put, "GiB/s", tcp_put, ceiling_is="tcp transport")
        emit(BENCH, f"nixl_get_{label}", get, "GiB/s", tcp_get, ceiling_is="tcp transport")


#: transport name -> case function, merged into ``bench/transport.py``'s registry.
SHM_NIXL_CASES: dict[str, Callable[[Any], None]] = {"shm": bench_shm, "nixl": bench_nixl}
