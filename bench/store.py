"""Benchmarks of the tiered store: host tier vs ``torch.Tensor.copy_``, disk tier vs plain file I/O.

Run: ``python bench/store.py`` (one JSON object per line on stdout).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_host() -> None:
    """HostTier put/get of 1, 2 and 4 MiB chunks against ``copy_`` of the same bytes; Store.get from disk.

    ``host_*_256KiB_in_8MiB``: 256 KiB chunks in a tier whose ``slot_bytes`` is 8 MiB, so every chunk goes
    through the slab allocator's small-class path (32 slots per 8 MiB page).

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
    # One intra-op thread for both sides (KVSTRATA_BENCH_COPY_THREADS to change it): a tier's copy runs on
    # its caller's thread, many callers at once; torch's parallel copy_ on a small shared machine measures
    # OpenMP scheduling noise (ratios swing 0.5-1.4 between runs) rather than the tier.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("KVSTRATA_BENCH_COPY_THREADS", 1)))
    try:

        def timed(fn: object) -> float:
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            return time.perf_counter() - start

        def host_case(chunk: int, slot: int | None = None) -> None:
            n = max(4, total // chunk)
            label = f"{chunk // mib}MiB" if chunk >= mib else f"{chunk // 1024}KiB"
            if slot is not None:
                label += f"_in_{slot // mib}MiB"
            log(f"host tier: {n} chunks of {label}")
            keys = [i.to_bytes(16, "little") for i in range(n)]
            srcs = [torch.randint(0, 256, (chunk,), dtype=torch.uint8) for _ in range(n)]
            outs = [torch.empty(chunk, dtype=torch.uint8) for _ in range(n)]
            dsts = [torch.empty(chunk, dtype=torch.uint8) for _ in range(n)]  # the ceiling's destination
            for t in outs + dsts:
                t.fill_(0)  # fault the pages in: both sides copy into warm memory
            # One spare slot: a put replacing a present key takes a free slot before releasing the old one.
            # (With slot > chunk: one spare page, the slab allocator's smallest room for a new class.)
            tier = HostTier((n + 1) * chunk if slot is None else n * chunk + slot, slot or chunk)
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
                    f"host_{op}_{label}",
                    gib_per_s(nbytes, med[op]),
                    "GiB/s",
                    gib_per_s(nbytes, med[f"{op}_ceiling"]),
                    chunks=n,
                )
            tier.close()

        for chunk_bytes in (1 * mib, 2 * mib, 4 * mib):
            host_case(chunk_bytes)
        host_case(256 * 1024, slot=8 * mib)

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
                    f.write(src.numpy().data)
                paths.append(path)

            def store_get() -> None:
                for key, out in zip(keys, outs, strict=True):
                    store.get(key, out=out)

            def plain_read() -> None:
                for path, out in zip(paths, outs, strict=True):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.preadv(fd, [out.numpy().data], 0)
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
    finally:
        torch.set_num_threads(threads_before)


def bench_disk() -> None:
    """DiskTier write/read of 1 and 4 MiB chunks against plain file write/read of the same bytes.

    The ceiling is measured in the same run, on the same file system and the same bytes: plain ``os.write``
    of each chunk over its own file (``O_TRUNC``, the same fsync policy, and with fsync the directory too),
    and ``os.preadv`` of each file into a preallocated buffer. DiskTier does more per chunk: a checksum, a
    4 KiB header, a temporary file renamed over the old one; on reads, the checksum. Rounds alternate between
    the two; the median of each is reported. "page_cache" reads come from the page cache (the common case for
    a recently written chunk, and what both sides then measure); "cold" reads first drop both sides' files
    from the page cache with ``posix_fadvise(DONTNEED)``, so they measure the device (on a file system that
    honours it; tmpfs does not). Files go to a temporary directory under ``$KVSTRATA_BENCH_DIR`` (default:
    the system's temporary directory); ``$KVSTRATA_BENCH_DISK_BYTES`` sets the bytes per round (32 MiB).
    """
    import shutil
    import statistics
    import tempfile
    import time
    from collections.abc import Callable
    from functools import partial

    import torch

    from bench._common import emit, gib_per_s, log
    from kvstrata.core.chunk import ChunkMeta
    from kvstrata.kvstore.disk import DiskTier

    def plain_write(paths: list[str], chunks: list[torch.Tensor], fsync: bool) -> None:
        for path, chunk in zip(paths, chunks, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, chunk.numpy().data)
                if fsync:
                    os.fdatasync(fd)  # what DiskTier(fsync=True) does for a file's bytes
            finally:
                os.close(fd)
        if fsync:
            dfd = os.open(os.path.dirname(paths[0]), os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

    def tier_write(tier: DiskTier, keys: list[bytes], chunks: list[torch.Tensor], meta: ChunkMeta) -> None:
        for key, chunk in zip(keys, chunks, strict=True):
            tier.put(key, chunk, meta)

    def plain_read(paths: list[str], out: torch.Tensor) -> None:
        view = memoryview(out.numpy())  # type: ignore[arg-type]
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                pos = 0
                while pos < len(view):
                    got = os.preadv(fd, [view[pos:]], pos)
                    if got <= 0:
                        raise RuntimeError("short read")
                    pos += got
            finally:
                os.close(fd)

    def tier_read(tier: DiskTier, keys: list[bytes], out: torch.Tensor) -> None:
        for key in keys:
            if tier.get(key, out=out) is None:
                raise RuntimeError("disk tier miss in the benchmark")

    def drop_cache(paths: list[str]) -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def drop_both(first: list[str], second: list[str]) -> None:
        drop_cache(first)
        drop_cache(second)

    def compare(
        case: str, nbytes: int, ceiling: Callable[[], None], tier_fn: Callable[[], None], rounds: int,
        extra: dict[str, object], before: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        times: dict[str, list[float]] = {"plain": [], "tier": []}
        for _ in range(rounds):
            for side, fn in (("plain", ceiling), ("tier", tier_fn)):
                if before is not None:
                    before()
                start = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - start)
        value = gib_per_s(nbytes, statistics.median(times["tier"]))
        emit("store", case, value, "GiB/s", gib_per_s(nbytes, statistics.median(times["plain"])), **extra)

    total = int(os.environ.get("KVSTRATA_BENCH_DISK_BYTES", 32 * 1024**2))
    rounds = int(os.environ.get("KVSTRATA_BENCH_ROUNDS", 7))
    root = tempfile.mkdtemp(prefix="kvstrata-bench-disk-", dir=os.environ.get("KVSTRATA_BENCH_DIR"))
    try:
        for size_mib in (1, 4):
            size = size_mib * 1024**2
            count = max(4, total // size)
            nbytes = count * size
            chunks = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(count)]
            keys = [i.to_bytes(16, "little") for i in range(count)]
            meta = ChunkMeta(block_keys=(keys[0],) * 16, fingerprint=bytes(16), num_tokens=256)
            out = torch.zeros(size, dtype=torch.uint8)  # faulted in once, as a reused pool slot would be
            for fsync in (False, True):
                tag = f"{size_mib}MiB" + ("_fsync" if fsync else "")
                plain_dir = os.path.join(root, f"plain-{tag}")
                os.makedirs(plain_dir)
                paths = [os.path.join(plain_dir, f"{i}.bin") for i in range(count)]
                tier = DiskTier(os.path.join(root, f"tier-{tag}"), 2 * count * (size + 8192), fsync=fsync)
                extra: dict[str, object] = {"checksum": tier.checksum_algorithm, "chunks": count}
                try:
                    writes = (
                        partial(plain_write, paths, chunks, fsync),
                        partial(tier_write, tier, keys, chunks, meta),
                    )
                    for fn in writes:
                        fn()  # first write of every file, untimed: the timed rounds replace chunks
                    compare(f"disk_write_{tag}", nbytes, *writes, rounds, extra)
                    log(f"disk {tag}: {count} chunks per round, checksum {tier.checksum_algorithm}")
                    if fsync:
                        continue  # reads do not depend on the fsync policy
                    reads = (partial(plain_read, paths, out), partial(tier_read, tier, keys, out))
                    # A page-cache round takes milliseconds, so one preemption on a shared machine skews
                    # it: many rounds, median.
                    compare(f"disk_read_{tag}_page_cache", nbytes, *reads, 5 * rounds, extra)
                    tier_paths = [str(tier.path_of(k)) for k in keys]
                    cold = partial(drop_both, paths, tier_paths)
                    compare(f"disk_read_{tag}_cold", nbytes, *reads, max(3, rounds // 2), extra, before=cold)
                finally:
                    tier.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    bench_host()
    bench_disk()
