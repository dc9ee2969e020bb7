"""A slab allocator of variable-size slots carved from one preallocated byte buffer (host or device memory).

The memory tiers keep every chunk in one slot of a :class:`SlotPool`, so the hot path never allocates: a put
is one ``copy_`` into a free slot, a get one ``copy_`` out of it. A cache server receives chunks of many
sizes (256 KiB for small models or layer-wise transfers, a few MiB typically, tens of MiB for large models),
so slots come in size classes rather than one fixed size:

- The buffer is divided into **pages** of ``slot_bytes`` (the largest class: the largest chunk the pool
  holds). A slot never straddles a page.
- **Size classes** are the powers of two from a minimum (64 KiB by default, less for small pages) up to
  half a page, plus the whole page. A chunk takes the smallest class that fits, so at most half of a slot
  is wasted, and nothing for chunks of a power-of-two size or of exactly ``slot_bytes``.
- A free page is **assigned to a class** when that class needs room and has no free slot left; it is cut
  into ``page // class`` slots. When all its slots are free again it **returns to the free-page list** and
  may serve any class next.
- Offsets into :attr:`SlotPool.buffer` name the slots, so a slot's offset is also where a transport (the
  ``shm`` segment) finds the bytes.

The buffer is allocated once with ``torch.empty`` (which does not fault its pages in) or handed in by the
caller (POSIX shared memory for the ``shm`` transport). Fresh pages are handed out in address order, freed
pages and freed slots are reused last-in first-out, and a class fills the page it used last first, so a pool
larger than its working set touches only the memory it needs and reuses the warm pages.

Host buffers are page-locked lazily when CUDA is present: each segment of the buffer is registered with
``cudaHostRegister`` the first time a page in it is handed out, so a large pool starts instantly and pins
only what it uses (``torch.empty(pin_memory=True)`` would pin it all at once and round it up to a power of
two).

Every operation is O(1) (cutting a page into slots or returning it is O(slots per page), at most
page / minimum class). The views of slots are made once and reused (a ``narrow`` allocates a tensor object),
so a put or get of a chunk whose slot held a chunk of the same length before allocates nothing; the views
of a page are dropped when it returns to the free-page list. Not thread-safe: the owning tier calls it under
its own lock.
"""

from __future__ import annotations

import logging

import torch

from kvstrata.errors import InvalidArgumentError

__all__ = ["DEFAULT_MIN_CLASS_BYTES", "SlotPool", "default_min_class"]

log = logging.getLogger(__name__)

#: Host memory is page-locked in segments of this size (rounded to whole pages) as it comes into use.
PIN_SEGMENT_BYTES = 256 * 1024**2

#: The smallest size class of a pool whose pages are large (``slot_bytes >= 8 MiB``).
DEFAULT_MIN_CLASS_BYTES = 64 * 1024

#: Smaller pages get a proportionally smaller minimum class: at most this many minimum slots per page...
_MAX_SLOTS_PER_PAGE = 128
#: ...but never a class below this many bytes (bookkeeping would outweigh the bytes).
_SMALLEST_CLASS_BYTES = 64


def default_min_class(slot_bytes: int) -> int:
    """The default smallest class for pages of ``slot_bytes``: 64 KiB, less for pages under 8 MiB."""
    floor_pow2 = 1 << (max(1, slot_bytes).bit_length() - 1)
    return max(_SMALLEST_CLASS_BYTES, min(DEFAULT_MIN_CLASS_BYTES, floor_pow2 // _MAX_SLOTS_PER_PAGE))


class SlotPool:
    """Pages of ``slot_bytes`` in one flat ``uint8`` buffer, cut into slots of power-of-two size classes.

    ``buffer`` (optional) is an externally owned 1-D ``uint8`` tensor of at least ``capacity_bytes``; the pool
    uses its first ``num_pages * slot_bytes`` bytes, so slot offsets are offsets into that buffer.
    ``min_class_bytes`` (a power of two; default :func:`default_min_class`) is the smallest slot size.

    Slots are named by their byte offset: :meth:`alloc` returns one, :meth:`free` takes it back.
    """

    def __init__(
        self,
        capacity_bytes: int,
        slot_bytes: int,
        *,
        device: torch.device | str = "cpu",
        buffer: torch.Tensor | None = None,
        pin_memory: bool = False,
        min_class_bytes: int | None = None,
    ) -> None:
        if slot_bytes <= 0:
            raise InvalidArgumentError(f"slot_bytes must be positive, got {slot_bytes}")
        if capacity_bytes < slot_bytes:
            raise InvalidArgumentError(
                f"capacity_bytes ({capacity_bytes}) must hold at least one slot of {slot_bytes} bytes"
            )
        min_class = default_min_class(slot_bytes) if min_class_bytes is None else min_class_bytes
        if min_class <= 0 or min_class & (min_class - 1):
            raise InvalidArgumentError(f"min_class_bytes must be a positive power of two, got {min_class}")
        self.slot_bytes = slot_bytes
        self.num_pages = capacity_bytes // slot_bytes
        self.capacity_bytes = self.num_pages * slot_bytes
        size = self.capacity_bytes
        if buffer is not None:
            if buffer.dim() != 1 or buffer.dtype != torch.uint8 or not buffer.is_contiguous():
                raise InvalidArgumentError("a pool buffer must be a contiguous 1-D uint8 tensor")
            if buffer.numel() < capacity_bytes:
                raise InvalidArgumentError(
                    f"the pool buffer holds {buffer.numel()} bytes < capacity_bytes={capacity_bytes}"
                )
            self.buffer = buffer[:size]
        else:
            # torch.empty does not touch the pages: memory is committed as pages come into use.
            self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        self.device = self.buffer.device

        # Classes: powers of two that fit at least twice in a page, then the whole page.
        sizes: list[int] = []
        cls = min_class
        while 2 * cls <= slot_bytes:
            sizes.append(cls)
            cls *= 2
        sizes.append(slot_bytes)
        #: Slot sizes of the classes, smallest first; the last one is the whole page (``slot_bytes``).
        self.class_sizes: tuple[int, ...] = tuple(sizes)
        self._top = len(sizes) - 1
        self._largest_small = sizes[-2] if len(sizes) > 1 else 0  # above it: the page class
        self._min_shift = min_class.bit_length() - 1
        self._per_page = [slot_bytes // s for s in sizes]

        self.used_bytes = 0  # class bytes of the slots handed out (what the holders occupy)
        self.used_slots = 0
        self._free_pages: list[int] = []  # freed pages, reused last-in first-out (warm)
        self._fresh = 0  # pages >= this index have never been handed out
        self._page_class = [-1] * self.num_pages  # class index of each page; -1: free
        self._page_used = [0] * self.num_pages  # slots handed out in each page
        # Free slot offsets of each page of a small class (popped from the end: address order at first).
        self._page_free: dict[int, list[int]] = {}
        # Per small class: its pages with a free slot, as an insertion-ordered set (the last is used first).
        self._partial: list[dict[int, None]] = [{} for _ in sizes]

        self._pin = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self._segment_pages = max(1, PIN_SEGMENT_BYTES // slot_bytes)
        self._pinned_segments: list[int] = []
        # Slot views are made once and reused: narrow() allocates a tensor and costs microseconds. A view is
        # keyed by its offset and checked for its length, so one made for an earlier use of the slot is
        # still right for a later one; views are kept when a page is freed (a put that replaces chunks frees
        # and re-takes pages all the time), so the cache holds at most one view per slot start: no more
        # than when every page is in use with the smallest class.
        self._views: dict[int, torch.Tensor] = {}
        # The host buffer as one flat memoryview: a slot's memoryview is a slice of it (a fraction of a
        # microsecond, where tensor.numpy() plus memoryview() costs microseconds per chunk on the wire path).
        self._mem: memoryview | None = (
            memoryview(self.buffer.numpy()).cast("B")  # type: ignore[arg-type]
            if self.device.type == "cpu" and size
            else None
        )

    # -- sizes ---------------------------------------------------------------------------------------------
    def class_of(self, nbytes: int) -> int:
        """Index (into :attr:`class_sizes`) of the smallest class holding ``nbytes``."""
        if nbytes > self.slot_bytes:
            raise InvalidArgumentError(f"{nbytes} bytes exceed the pool's largest slot ({self.slot_bytes})")
        if nbytes <= 0:
            return 0
        index = (nbytes - 1).bit_length() - self._min_shift
        if index <= 0:
            return 0
        return index if index < self._top else self._top

    def slot_size_for(self, nbytes: int) -> int:
        """Bytes of the slot a chunk of ``nbytes`` takes."""
        return self.class_sizes[self.class_of(nbytes)]

    def class_at(self, offset: int) -> int:
        """Class index of the slot at ``offset`` (a slot handed out and not freed)."""
        return self._page_class[offset // self.slot_bytes]

    def slot_size(self, offset: int) -> int:
        """Bytes of the slot at ``offset`` (a slot handed out and not freed)."""
        return self.class_sizes[self._page_class[offset // self.slot_bytes]]

    def page_of(self, offset: int) -> int:
        """Index of the page holding ``offset``."""
        return offset // self.slot_bytes

    def page_used(self, page: int) -> int:
        """Slots of ``page`` handed out and not yet freed."""
        return self._page_used[page]

    @property
    def free_pages(self) -> int:
        """Pages assigned to no class (fresh or returned)."""
        return len(self._free_pages) + self.num_pages - self._fresh

    @property
    def used_pages(self) -> int:
        """Pages assigned to a class."""
        return self.num_pages - self.free_pages

    @property
    def free_bytes(self) -> int:
        """Bytes :meth:`alloc` could still hand out in slots (free pages and free slots of assigned pages)."""
        return self.capacity_bytes - self.used_bytes

    @property
    def pinned(self) -> bool:
        """Whether host pages are page-locked as they come into use."""
        return self._pin

    def can_alloc(self, nbytes: int) -> bool:
        """Whether :meth:`alloc` of ``nbytes`` would succeed now."""
        index = self.class_of(nbytes)
        if index != self._top and self._partial[index]:
            return True
        return bool(self._free_pages) or self._fresh < self.num_pages

    # -- allocation ------------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free slot of the smallest class holding ``nbytes``, or ``None`` when that class
        has no free slot and no page is free."""
        if nbytes > self._largest_small:
            # The page class (the common case of chunks of the configured chunk size): a page of its own.
            if nbytes > self.slot_bytes:
                raise InvalidArgumentError(
                    f"{nbytes} bytes exceed the pool's largest slot ({self.slot_bytes})"
                )
            taken = self._free_pages.pop() if self._free_pages else self._take_page()
            if taken is None:
                return None
            page = taken
            self._page_class[page] = self._top
            self._page_used[page] = 1
            self.used_bytes += self.slot_bytes
            self.used_slots += 1
            return page * self.slot_bytes
        index = self.class_of(nbytes)
        partial = self._partial[index]
        if partial:
            page = next(reversed(partial))  # the page this class used last: its slots are warm
            free = self._page_free[page]
            offset = free.pop()
            if not free:
                del partial[page]
        else:
            taken = self._take_page()
            if taken is None:
                return None
            page = taken
            size = self.class_sizes[index]
            offset = page * self.slot_bytes
            # The rest of the page, highest offset first so that pops hand out slots in address order.
            free = list(range(offset + (self._per_page[index] - 1) * size, offset, -size))
            self._page_free[page] = free
            self._page_class[page] = index
            if free:
                partial[page] = None
        self._page_used[page] += 1
        self.used_bytes += self.class_sizes[index]
        self.used_slots += 1
        return offset

    def free(self, offset: int) -> None:
        """Give the slot at ``offset`` back; its page returns to the free-page list once wholly free."""
        page = offset // self.slot_bytes
        index = self._page_class[page]
        if index == self._top:
            self.used_bytes -= self.slot_bytes
            self.used_slots -= 1
            self._page_used[page] = 0
            self._page_class[page] = -1
            self._free_pages.append(page)
            return
        if index < 0:
            raise InvalidArgumentError(f"offset {offset} is not in a page in use")
        self.used_bytes -= self.class_sizes[index]
        self.used_slots -= 1
        used = self._page_used[page] - 1
        self._page_used[page] = used
        free = self._page_free[page]
        if used == 0:
            # Wholly free: back to the free-page list, for any class.
            self._partial[index].pop(page, None)
            del self._page_free[page]
            self._page_class[page] = -1
            self._free_pages.append(page)
            return
        if not free:
            self._partial[index][page] = None
        free.append(offset)

    def _take_page(self) -> int | None:
        if self._free_pages:
            return self._free_pages.pop()  # warm
        if self._fresh >= self.num_pages:
            return None
        page = self._fresh
        self._fresh += 1
        if self._pin and page % self._segment_pages == 0:
            self._pin_segment(page)
        return page

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` from ``offset`` (a slot handed out) as a 1-D ``uint8`` view (no copy; made once and
        reused while the slot's page stays in use and chunks of that length come back to it)."""
        view = self._views.get(offset)
        if view is None or view.numel() != nbytes:
            view = self._views[offset] = self.buffer.narrow(0, offset, nbytes)
        return view

    def host_view(self, offset: int, nbytes: int) -> memoryview | None:
        """``nbytes`` from ``offset`` as a flat writable memoryview (no copy); ``None`` for a device pool."""
        mem = self._mem
        return None if mem is None else mem[offset : offset + nbytes]

    # -- page-locking and shutdown ------------------------------------------------------------------------
    def _pin_segment(self, first_page: int) -> None:
        start = first_page * self.slot_bytes
        length = min(self._segment_pages, self.num_pages - first_page) * self.slot_bytes
        try:
            cudart = torch.cuda.cudart()
            ptr = self.buffer.data_ptr() + start
            err = cudart.cudaHostRegister(ptr, length, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
        except Exception as exc:  # pinning is an optimisation: fall back to pageable memory
            log.warning("host pool: page-locking failed (%s); continuing with pageable memory", exc)
            self._pin = False
            return
        self._pinned_segments.append(start)

    def close(self) -> None:
        """Unpin what was pinned and drop the buffer reference; later allocations fail."""
        if self._pinned_segments:
            try:
                cudart = torch.cuda.cudart()
                base = self.buffer.data_ptr()
                for start in self._pinned_segments:
                    cudart.cudaHostUnregister(base + start)
            except Exception as exc:  # best effort at shutdown
                log.warning("host pool: unpinning failed: %s", exc)
            self._pinned_segments.clear()
        self._free_pages.clear()
        self._page_free.clear()
        for partial in self._partial:
            partial.clear()
        self._views.clear()
        self._mem = None
        self._fresh = self.num_pages
        self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
