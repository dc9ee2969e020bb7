"""Benchmarks of the tiered store: host tier vs ``torch.Tensor.copy_``, disk tier vs plain file I/O.

Run: ``python bench/store.py`` (one JSON object per line on stdout).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_host() -> None:
    """HostTier put/get of 1, 2 and 4 MiB chunks against ``copy_`` of the same bytes; Store.get from disk.

    Per chunk size, ``KVSTRATA_BENCH_HOST_BYTES`` (default 128 MiB, more than the CPU caches) of distinct
    source chunks is put into a HostTier whose pool is allocated and warmed once, then read back into
    preallocated ``out`` tensors. The ceiling is ``torch.Tensor.copy_`` of the same chunks between
    preallocated, warmed tensors of the same sizes, in the same run. Rounds alternate tier and ceiling; the
    median of each is reported (GiB/s; ratio = tier / ceiling). Puts replace present keys, so every round
    goes through the whole put path (slot reservation, copy, publish, free of the old slot).

    ``store_get_from_disk``: Store([host, disk]).get of chunks that are only on disk (page cache warm),
    promotion into the host tier included, against plain ``os.preadv`` of the same bytes from one file per
    chunk into a preallocated buffer.
    """
    import shutil
    import statistics
    import tempfile
    import time

    import torch

    from bench._common import emit, gib_per_s, log
    from kvstrata.kvstore.host import HostTier

    total = int(os.environ.get("KVSTRATA_BENCH_HOST_BYTES", 128 * 1024**2))
    rounds = int(os.environ.get("KVSTRATA_BENCH_ROUNDS", 7))
    mib = 1024**2

    def timed(fn: object) -> float:
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        return time.perf_counter() - start

    def host_case(chunk: int) -> None:
        n = max(4, total // chunk)
        log(f"host tier: {n} chunks of {chunk // mib} MiB")
        keys = [i.to_bytes(16, "little") for i in range(n)]
        srcs = [torch.randint(0, 256, (chunk,), dtype=torch.uint8) for _ in range(n)]
        outs = [torch.empty(chunk, dtype=torch.uint8) for _ in range(n)]
        dsts = [torch.empty(chunk, dtype=torch.uint8) for _ in range(n)]  # the ceiling's destination
        for t in outs + dsts:
            t.fill_(0)  # fault the pages in: both sides copy into warm memory
        # One spare slot: a put that replaces a present key takes a free slot before releasing the old one.
        tier = HostTier((n + 1) * chunk, chunk)
        tier.buffer.fill_(0)
        nbytes = n * chunk

        def put_all() -> None:
            for key, src in zip(keys, srcs, strict=True):
                tier.put(key, src)

        def get_all() -> None:
            for key, out in zip(keys, outs, strict=True):
                tier.get(key, out=out)

        def copy_in() -> None:
            for dst, src in zip(dsts, srcs, strict=True):
                dst.copy_(src)

        def copy_out() -> None:
            for out, dst in zip(outs, dsts, strict=True):
                out.copy_(dst)

        put_all()
        get_all()
        same = all(torch.equal(o, s) for o, s in zip(outs, srcs, strict=True))
        assert same, "the host tier returned wrong bytes"
        times: dict[str, list[float]] = {"put": [], "put_ceiling": [], "get": [], "get_ceiling": []}
        for _ in range(rounds):
            times["put"].append(timed(put_all))
            times["put_ceiling"].append(timed(copy_in))
            times["get"].append(timed(get_all))
            times["get_ceiling"].append(timed(copy_out))
        med = {k: statistics.median(v) for k, v in times.items()}
        for op in ("put", "get"):
            emit(
                "store",
                f"host_{op}_{chunk // mib}MiB",
                gib_per_s(nbytes, med[op]),
                "GiB/s",
                gib_per_s(nbytes, med[f"{op}_ceiling"]),
                chunks=n,
            )
        tier.close()

    for chunk_bytes in (1 * mib, 2 * mib, 4 * mib):
        host_case(chunk_bytes)

    # Store.get of chunks found only on disk, promoted into the host tier on the way.
    try:
        from kvstrata.kvstore.disk import DiskTier
    except ImportError:
        log("no disk tier: store_get_from_disk skipped")
        return
    from kvstrata.kvstore.store import Store

    chunk = 2 * mib
    n = max(4, min(total, 64 * mib) // chunk)
    root = tempfile.mkdtemp(prefix="kvstrata-bench-store-", dir=os.environ.get("KVSTRATA_BENCH_DIR"))
    try:
        host = HostTier((n + 1) * chunk, chunk)
        host.buffer.fill_(0)
        disk = DiskTier(os.path.join(root, "tier"), 4 * n * chunk)
        store = Store([host, disk], high_watermark=1.0, low_watermark=1.0)
        keys = [(10_000 + i).to_bytes(16, "little") for i in range(n)]
        srcs = [torch.randint(0, 256, (chunk,), dtype=torch.uint8) for _ in range(n)]
        outs = [torch.zeros(chunk, dtype=torch.uint8) for _ in range(n)]
        plain = os.path.join(root, "plain")
        os.mkdir(plain)
        paths = []
        for key, src in zip(keys, srcs, strict=True):
            disk.put(key, src)
            path = os.path.join(plain, key.hex())
            with open(path, "wb") as f:
                f.write(memoryview(src.numpy()))
            paths.append(path)

        def store_get() -> None:
            for key, out in zip(keys, outs, strict=True):
                store.get(key, out=out)

        def plain_read() -> None:
            for path, out in zip(paths, outs, strict=True):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.preadv(fd, [memoryview(out.numpy())], 0)
                finally:
                    os.close(fd)

        def evict_host() -> None:
            for key in keys:
                host.remove(key)

        store_get()
        same = all(torch.equal(o, s) for o, s in zip(outs, srcs, strict=True))
        assert same, "the store returned wrong bytes"
        assert all(host.contains(k) for k in keys), "the disk hits were promoted"
        got: list[float] = []
        ceiling: list[float] = []
        for _ in range(rounds):
            evict_host()
            got.append(timed(store_get))
            ceiling.append(timed(plain_read))
        emit(
            "store",
            "store_get_from_disk_2MiB",
            gib_per_s(n * chunk, statistics.median(got)),
            "GiB/s",
            gib_per_s(n * chunk, statistics.median(ceiling)),
            chunks=n,
            note="includes promotion into the host tier; ceiling: plain preadv, page cache warm",
        )
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_disk() -> None:
    """DiskTier write/read against plain file write/read of the same bytes (owned by the disk-tier work)."""
    raise NotImplementedError


if __name__ == "__main__":
    bench_host()
    bench_disk()
