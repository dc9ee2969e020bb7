"""SlotPool: a slab allocator over one buffer — pages of ``slot_bytes`` cut into power-of-two size classes,
fresh pages in address order, freed slots and pages reused first, pages recycled between classes."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.pool import SlotPool, default_min_class

KIB = 1024
MIB = 1024**2


def test_whole_page_slots_are_views_of_one_buffer() -> None:
    pool = SlotPool(10_000, 1024)
    assert pool.num_pages == 9 and pool.free_pages == 9 and pool.used_slots == 0
    assert pool.capacity_bytes == 9 * 1024
    slots = [pool.alloc(1024) for _ in range(9)]
    assert slots == [i * 1024 for i in range(9)], "fresh pages come in address order"
    assert pool.alloc(1024) is None and pool.free_pages == 0
    assert pool.alloc(1) is None, "no page left for any class"
    base = pool.buffer.data_ptr()
    for slot in slots:
        assert slot is not None
        view = pool.view(slot, 100)
        assert view.data_ptr() == base + slot
        assert view.numel() == 100
    pool.view(3 * 1024, 1024).fill_(7)
    assert bool((pool.buffer[3 * 1024 : 4 * 1024] == 7).all())


def test_freed_slots_are_reused_last_in_first_out() -> None:
    pool = SlotPool(4 * 1024, 1024)
    a, b, c = pool.alloc(1024), pool.alloc(1024), pool.alloc(1024)
    assert (a, b, c) == (0, 1024, 2048)
    pool.free(0)
    pool.free(2048)
    assert pool.used_slots == 1 and pool.used_bytes == 1024
    assert pool.alloc(1024) == 2048, "the most recently freed (warm) page first"
    assert pool.alloc(1024) == 0
    assert pool.alloc(1024) == 3072, "then a fresh one"
    assert pool.alloc(1024) is None


def test_size_classes() -> None:
    big = SlotPool(8 * MIB, 8 * MIB, device="meta")
    assert big.class_sizes == (64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB, 2 * MIB, 4 * MIB, 8 * MIB)
    assert default_min_class(32 * MIB) == 64 * KIB
    assert default_min_class(4096) == 64 and default_min_class(1024) == 64
    assert default_min_class(2 * MIB) == 16 * KIB, "smaller pages get a smaller minimum class"
    for nbytes, size in [
        (0, 64 * KIB),
        (1, 64 * KIB),
        (64 * KIB, 64 * KIB),
        (64 * KIB + 1, 128 * KIB),
        (256 * KIB, 256 * KIB),
        (3 * MIB, 4 * MIB),
        (4 * MIB + 1, 8 * MIB),
        (8 * MIB, 8 * MIB),
    ]:
        assert big.slot_size_for(nbytes) == size, nbytes
        if nbytes > 0:
            assert size < 2 * nbytes or size == 64 * KIB, "less than half of a slot is wasted"
    with pytest.raises(InvalidArgumentError):
        big.class_of(8 * MIB + 1)
    # A page that is not a power of two: classes fit at least twice in it, then the whole page.
    odd = SlotPool(14 * MIB, 14 * MIB, device="meta")
    assert odd.class_sizes[-2:] == (4 * MIB, 14 * MIB)
    assert odd.slot_size_for(5 * MIB) == 14 * MIB
    odd_slots = [odd.alloc(4 * MIB) for _ in range(4)]
    assert odd_slots == [0, 4 * MIB, 8 * MIB, None], "three 4 MiB slots in a 14 MiB page"
    tiny = SlotPool(4096, 4096, min_class_bytes=4096)
    assert tiny.class_sizes == (4096,), "a minimum class over half a page leaves only the page class"


def test_small_chunks_share_a_page_and_the_page_comes_back() -> None:
    pool = SlotPool(2 * MIB, 1 * MIB, min_class_bytes=64 * KIB)
    offsets = [pool.alloc(100 * KIB) for _ in range(8)]
    assert offsets == [i * 128 * KIB for i in range(8)], "one page, its slots in address order"
    assert pool.used_pages == 1 and pool.used_bytes == 8 * 128 * KIB
    assert pool.alloc(1 * MIB) == 1 * MIB, "the second page serves the page class"
    assert pool.alloc(128 * KIB) is None and pool.alloc(64 * KIB) is None
    for off in offsets[:7]:
        assert off is not None
        pool.free(off)
    assert pool.used_pages == 2, "a page with a live slot stays assigned"
    assert pool.alloc(200 * KIB) is None, "another class cannot use a partly free page"
    assert pool.alloc(128 * KIB) == offsets[6], "its own class reuses the warm slot"
    pool.free(offsets[6])  # type: ignore[arg-type]
    pool.free(offsets[7])  # type: ignore[arg-type]
    assert pool.used_pages == 1 and pool.free_pages == 1 and pool.used_bytes == 1 * MIB
    assert pool.alloc(256 * KIB) == 0, "the wholly free page is re-cut for another class"
    assert pool.alloc(256 * KIB) == 256 * KIB
    pool.free(0)
    pool.free(256 * KIB)
    pool.free(1 * MIB)
    assert pool.used_bytes == 0 and pool.free_pages == 2
    with pytest.raises(InvalidArgumentError):
        pool.free(0)  # its page is free: a double free is refused


def test_external_buffer() -> None:
    buffer = torch.zeros(5000, dtype=torch.uint8)
    pool = SlotPool(4096, 1024, buffer=buffer)
    assert pool.buffer.data_ptr() == buffer.data_ptr()
    slot = pool.alloc(10)
    assert slot is not None
    pool.view(slot, 10).fill_(3)
    assert buffer[slot : slot + 10].tolist() == [3] * 10, "the pool writes into the caller's buffer"
    with pytest.raises(InvalidArgumentError):
        SlotPool(8192, 1024, buffer=buffer)  # too small
    with pytest.raises(InvalidArgumentError):
        SlotPool(1024, 1024, buffer=torch.zeros(2048, dtype=torch.float32))
    with pytest.raises(InvalidArgumentError):
        SlotPool(1024, 1024, buffer=torch.zeros(64, 64, dtype=torch.uint8))


def test_bad_sizes() -> None:
    with pytest.raises(InvalidArgumentError):
        SlotPool(100, 1024)
    with pytest.raises(InvalidArgumentError):
        SlotPool(1024, 0)
    with pytest.raises(InvalidArgumentError):
        SlotPool(4096, 1024, min_class_bytes=96)
    with pytest.raises(InvalidArgumentError):
        SlotPool(4096, 1024).alloc(1025)


class _Model:
    """What the pool must guarantee, checked from the outside: live slots never overlap, each lies in one
    page of one class, accounting adds up, and ``alloc`` fails only when there really is no room."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.live: dict[int, tuple[int, int, int]] = {}  # offset -> (slot size, nbytes, fill value)

    def alloc(self, nbytes: int, fill: int) -> int | None:
        pool = self.pool
        size = pool.slot_size_for(nbytes)
        offset = pool.alloc(nbytes)
        page_classes: dict[int, int] = {}
        page_count: dict[int, int] = {}
        for off, (sz, _, _) in self.live.items():
            page_classes[off // pool.slot_bytes] = sz
            page_count[off // pool.slot_bytes] = page_count.get(off // pool.slot_bytes, 0) + 1
        if offset is None:
            assert len(page_classes) == pool.num_pages, "alloc failed with a wholly free page"
            for page, sz in page_classes.items():
                if sz == size:
                    assert page_count[page] == pool.slot_bytes // size, "alloc failed with a free slot"
            return None
        assert offset not in self.live
        assert offset % size == 0 or size == pool.slot_bytes, "slots are aligned to their class"
        page = offset // pool.slot_bytes
        assert page_classes.get(page, size) == size, "a page holds one class"
        assert offset + size <= (page + 1) * pool.slot_bytes, "a slot never straddles a page"
        pool.view(offset, nbytes).fill_(fill)
        self.live[offset] = (size, nbytes, fill)
        return offset

    def free(self, offset: int) -> None:
        self.pool.free(offset)
        del self.live[offset]

    def check(self) -> None:
        pool = self.pool
        spans = sorted((off, off + sz) for off, (sz, _, _) in self.live.items())
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "two live slots overlap"
        assert pool.used_bytes == sum(sz for sz, _, _ in self.live.values()) <= pool.capacity_bytes
        assert pool.used_slots == len(self.live)
        pages = {off // pool.slot_bytes for off in self.live}
        assert pool.used_pages == len(pages), "pages with no live slot are returned"
        for off, (_, nbytes, fill) in self.live.items():
            view = pool.view(off, nbytes)
            assert bool((view == fill).all()), "bytes read back exact"


SIZES = [1, 700, 1024, 1025, 3000, 4096, 5000, 8192, 16384, 20000, 32768]


def _run_workload(ops: list[tuple[bool, int]], *, pages: int = 6) -> _Model:
    model = _Model(SlotPool(pages * 32768, 32768, min_class_bytes=1024))
    for step, (is_alloc, choice) in enumerate(ops):
        if is_alloc or not model.live:
            model.alloc(SIZES[choice % len(SIZES)], step % 251)
        else:
            live = sorted(model.live)
            model.free(live[choice % len(live)])
        if step % 16 == 0:
            model.check()
    model.check()
    return model


def test_mixed_sizes_random_alloc_free_against_a_model() -> None:
    rng = random.Random(1234)
    ops = [(rng.random() < 0.55, rng.randrange(1 << 16)) for _ in range(3000)]
    model = _run_workload(ops)
    for off in list(model.live):
        model.free(off)
    model.check()
    assert model.pool.used_bytes == 0 and model.pool.free_pages == model.pool.num_pages, "every page back"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1 << 16)), max_size=120))
def test_mixed_sizes_property(ops: list[tuple[bool, int]]) -> None:
    model = _run_workload(ops, pages=3)
    for off in list(model.live):
        model.free(off)
    assert model.pool.used_bytes == 0 and model.pool.free_pages == 3


def test_a_pool_holds_capacity_over_size_small_chunks() -> None:
    pool = SlotPool(64 * MIB, 8 * MIB, device="meta")  # bookkeeping only: no memory behind it
    count = 0
    while pool.alloc(256 * KIB) is not None:
        count += 1
    assert count == 64 * MIB // (256 * KIB) == 256, "no slot of a 256 KiB chunk is wasted"
    assert pool.used_bytes == pool.capacity_bytes


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_large_pool_commits_only_the_pages_in_use() -> None:
    before = _rss_bytes()
    pool = SlotPool(8 * 1024**3, 8 * MIB)  # 8 GiB of address space
    slot = pool.alloc(8 * MIB)
    assert slot is not None
    pool.view(slot, 8 * MIB).fill_(1)
    small = [pool.alloc(64 * KIB) for _ in range(200)]  # two pages of small slots
    for off in small:
        assert off is not None
        pool.view(off, 64 * KIB).fill_(2)
    assert pool.num_pages == 1024 and pool.used_pages == 3
    assert _rss_bytes() - before < 256 * MIB, "only the touched pages are resident"
    pool.close()
    assert pool.free_pages == 0 and pool.alloc(8 * MIB) is None
