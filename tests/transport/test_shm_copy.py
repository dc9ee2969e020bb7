"""The shm client's copies between local tensors and the mapped segment: one batched ``copy_`` per batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from kvstrata.errors import ProtocolError
from kvstrata.transport.base import ServerAddress, TransportOptions
from kvstrata.transport.shm import SharedSegment, ShmTransport


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


def test_batches_from_several_threads_at_once_are_all_copied(mapped: ShmTransport) -> None:
    errors: list[BaseException] = []
    region = (8 << 20) // 4

    def worker(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(10):
                spans = [(seed * region + pos, n) for pos, n in _layout(gen, 6, region)]
                sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for _, n in spans]
                mapped._write_many([(pos, s) for (pos, _), s in zip(spans, sources, strict=True)])
                outs = [torch.empty(n, dtype=torch.uint8) for _, n in spans]
                mapped._read_many([(pos, o) for (pos, _), o in zip(spans, outs, strict=True)])
                assert all(torch.equal(o, s) for o, s in zip(outs, sources, strict=True)), seed
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
