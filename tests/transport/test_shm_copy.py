"""The shm client's host copies: one batch of memmoves shared by the calling thread and helper threads, and
the transport's copies between local tensors and the mapped segment."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from kvstrata.errors import ProtocolError
from kvstrata.transport import hostcopy
from kvstrata.transport.base import ServerAddress, TransportOptions
from kvstrata.transport.hostcopy import HostCopier
from kvstrata.transport.shm import SharedSegment, ShmTransport


def _pieces(src: torch.Tensor, dst: torch.Tensor, sizes: list[int]) -> list[tuple[int, int, int]]:
    """Pieces copying consecutive runs of ``src`` into ``dst`` in reverse order (so a misplaced or missed
    piece shows as wrong bytes)."""
    pieces, offset, end = [], 0, dst.numel()
    for n in sizes:
        end -= n
        pieces.append((dst.data_ptr() + end, src.data_ptr() + offset, n))
        offset += n
    return pieces


def _in_threads(worker: Callable[[int], None], count: int = 4) -> None:
    """Run ``worker(seed)`` in ``count`` threads at once; fail with what any of them raised."""
    errors: list[BaseException] = []

    def guarded(seed: int) -> None:
        try:
            worker(seed)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(seed,)) for seed in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def _reference(src: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out, offset = [], 0
    for n in sizes:
        out.append(src[offset : offset + n])
        offset += n
    return torch.cat(list(reversed(out)))


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_every_piece_lands_where_it_belongs(helpers: int) -> None:
    gen = torch.Generator().manual_seed(helpers)
    sizes = [int(s) for s in torch.randint(1, 300_000, (200,), generator=gen)]
    src = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=gen)
    dst = torch.zeros_like(src)
    HostCopier(helpers).copy(_pieces(src, dst, sizes))
    assert torch.equal(dst, _reference(src, sizes))


def test_batches_of_several_threads_at_once_are_all_copied() -> None:
    copier = HostCopier(2)

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(20):
            sizes = [int(x) for x in torch.randint(1, 1 << 20, (16,), generator=gen)]
            src = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=gen)
            dst = torch.zeros_like(src)
            copier.copy(_pieces(src, dst, sizes))
            assert torch.equal(dst, _reference(src, sizes)), f"thread {seed}: wrong bytes"

    _in_threads(worker)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_helpers() -> None:
    # Plain buffers only: torch in a child forked after it ran its own threads may hang.
    n = 4 << 20
    src = bytearray(os.urandom(n))
    dst = bytearray(n)
    src_at = ctypes.addressof((ctypes.c_char * n).from_buffer(src))
    dst_at = ctypes.addressof((ctypes.c_char * n).from_buffer(dst))
    step = 1 << 20
    pieces = [(dst_at + i, src_at + i, step) for i in range(0, n, step)]
    copier = HostCopier(1)
    copier.copy(pieces)  # helpers started in this process
    assert dst == src
    pid = os.fork()
    if pid == 0:  # the child: the parent's helper threads do not exist here
        code = 1
        try:
            ctypes.memset(dst_at, 0, n)
            copier.copy(pieces)
            helpers = [t for t in threading.enumerate() if t.name.startswith("kvstrata-shm-copy")]
            code = 0 if dst == src and len(helpers) == 1 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish its copy")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def _pinned_copy(copier: HostCopier, cpu: int, pieces: list[tuple[int, int, int]]) -> None:
    """One copy with the calling thread pinned to ``cpu`` (its affinity restored after)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        copier.copy(pieces)
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.skipif(
    hostcopy._CPU is None or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs, sched_getcpu"
)
def test_the_helpers_are_kept_off_the_callers_cpu() -> None:
    src = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    pieces = _pieces(src, dst, [1 << 20] * 4)
    copier = HostCopier(2)
    copier.copy(pieces)  # helpers started while the caller may run anywhere: they may too
    allowed = os.sched_getaffinity(0)
    deadline = time.monotonic() + 30
    while len(copier._tids) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(copier._tids) == 2
    for cpu in sorted(allowed)[:2]:
        dst.zero_()
        _pinned_copy(copier, cpu, pieces)
        assert torch.equal(dst, _reference(src, [1 << 20] * 4))
        # Every helper may run on every allowed CPU but the caller's.
        assert [os.sched_getaffinity(tid) for tid in copier._tids] == [allowed - {cpu}] * 2


@pytest.fixture
def mapped() -> Iterator[ShmTransport]:
    """A client transport whose segment is a real shared-memory mapping (no server needed to copy)."""
    transport = ShmTransport(ServerAddress("kvs+shm", "127.0.0.1", 1), TransportOptions())
    transport.segment = SharedSegment.create(8 << 20)
    yield transport
    seg, transport.segment = transport.segment, None
    seg.owner = True
    seg.close()


def _layout(gen: torch.Generator, count: int, limit: int) -> list[tuple[int, int]]:
    """``count`` (position, size) spans of varied sizes, placed in the segment in reverse order."""
    sizes = [int(s) for s in torch.randint(0, 300_000, (count,), generator=gen)]
    assert sum(sizes) <= limit
    spans, end = [], limit
    for n in sizes:
        end -= n
        spans.append((end, n))
    return spans


def test_every_span_lands_where_it_belongs_both_ways(mapped: ShmTransport) -> None:
    gen = torch.Generator().manual_seed(7)
    spans = _layout(gen, 24, 8 << 20)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for _, n in spans]
    mapped._write_many([(pos, src) for (pos, _), src in zip(spans, sources, strict=True)])
    seg = mapped._mapping().tensor
    for (pos, n), src in zip(spans, sources, strict=True):
        assert torch.equal(seg[pos : pos + n], src)
    outs = [torch.zeros(n, dtype=torch.uint8) for _, n in spans]
    mapped._read_many([(pos, out) for (pos, _), out in zip(spans, outs, strict=True)])
    for out, src in zip(outs, sources, strict=True):
        assert torch.equal(out, src)


def test_a_span_outside_the_segment_is_refused_before_anything_is_copied(mapped: ShmTransport) -> None:
    size = mapped._mapping().size
    good = torch.full((16,), 9, dtype=torch.uint8)
    bad = torch.ones(32, dtype=torch.uint8)
    for position in (size - 16, -1):
        with pytest.raises(ProtocolError, match="outside"):
            mapped._write_many([(0, good), (position, bad)])
        assert int(mapped._mapping().tensor[:16].sum()) == 0


def test_spans_from_several_threads_at_once_are_all_copied(mapped: ShmTransport) -> None:
    region = (8 << 20) // 4

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(10):
            spans = [(seed * region + pos, n) for pos, n in _layout(gen, 6, region)]
            sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for _, n in spans]
            mapped._write_many([(pos, src) for (pos, _), src in zip(spans, sources, strict=True)])
            outs = [torch.empty(n, dtype=torch.uint8) for _, n in spans]
            mapped._read_many([(pos, out) for (pos, _), out in zip(spans, outs, strict=True)])
            assert all(torch.equal(o, src) for o, src in zip(outs, sources, strict=True)), seed

    _in_threads(worker)
