"""A pool of fixed-size slots carved from one preallocated byte buffer (host or device memory).

The memory tiers keep every chunk in one slot of a :class:`SlotPool`, so the hot path never allocates: a put
is one ``copy_`` into a free slot, a get one ``copy_`` out of it. The buffer is allocated once with
``torch.empty`` (which does not fault its pages in) or handed in by the caller (POSIX shared memory for the
``shm`` transport). Fresh slots are handed out in address order and freed slots are reused last-in first-out,
so a pool larger than its working set touches only the pages it needs and reuses the warm ones.

Host buffers are page-locked lazily when CUDA is present: each segment of the buffer is registered with
``cudaHostRegister`` the first time a slot in it is handed out, so a large pool starts instantly and pins
only what it uses (``torch.empty(pin_memory=True)`` would pin it all at once and round it up to a power of
two).

Not thread-safe: the owning tier calls it under its own lock.
"""

from __future__ import annotations

import logging

import torch

from kvstrata.errors import InvalidArgumentError

__all__ = ["SlotPool"]

log = logging.getLogger(__name__)

#: Host memory is page-locked in segments of this size (rounded to whole slots) as it comes into use.
PIN_SEGMENT_BYTES = 256 * 1024**2


class SlotPool:
    """``num_slots`` slots of ``slot_bytes`` each in one flat ``uint8`` buffer.

    ``buffer`` (optional) is an externally owned 1-D ``uint8`` tensor of at least ``capacity_bytes``; the pool
    uses its first ``num_slots * slot_bytes`` bytes, so slot offsets are offsets into that buffer.
    """

    def __init__(
        self,
        capacity_bytes: int,
        slot_bytes: int,
        *,
        device: torch.device | str = "cpu",
        buffer: torch.Tensor | None = None,
        pin_memory: bool = False,
    ) -> None:
        if slot_bytes <= 0:
            raise InvalidArgumentError(f"slot_bytes must be positive, got {slot_bytes}")
        if capacity_bytes < slot_bytes:
            raise InvalidArgumentError(
                f"capacity_bytes ({capacity_bytes}) must hold at least one slot of {slot_bytes} bytes"
            )
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        size = self.num_slots * slot_bytes
        if buffer is not None:
            if buffer.dim() != 1 or buffer.dtype != torch.uint8 or not buffer.is_contiguous():
                raise InvalidArgumentError("a pool buffer must be a contiguous 1-D uint8 tensor")
            if buffer.numel() < capacity_bytes:
                raise InvalidArgumentError(
                    f"the pool buffer holds {buffer.numel()} bytes < capacity_bytes={capacity_bytes}"
                )
            self.buffer = buffer[:size]
        else:
            # torch.empty does not touch the pages: memory is committed as slots come into use.
            self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        self.device = self.buffer.device
        self._free: list[int] = []  # freed slots, reused last-in first-out (their pages are warm)
        self._fresh = 0  # slots >= this index have never been handed out
        self._pin = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self._segment_slots = max(1, PIN_SEGMENT_BYTES // slot_bytes)
        self._pinned_segments: list[int] = []
        self._views: dict[int, torch.Tensor] = {}

    @property
    def free_slots(self) -> int:
        """Slots that :meth:`alloc` can hand out now."""
        return len(self._free) + self.num_slots - self._fresh

    @property
    def used_slots(self) -> int:
        """Slots handed out and not yet freed."""
        return self.num_slots - self.free_slots

    @property
    def pinned(self) -> bool:
        """Whether host pages are page-locked as they come into use."""
        return self._pin

    def alloc(self) -> int | None:
        """A free slot's index, or ``None`` when every slot is in use."""
        if self._free:
            return self._free.pop()
        if self._fresh >= self.num_slots:
            return None
        slot = self._fresh
        self._fresh += 1
        if self._pin and slot % self._segment_slots == 0:
            self._pin_segment(slot)
        return slot

    def free(self, slot: int) -> None:
        """Give ``slot`` back to the pool."""
        self._free.append(slot)

    def offset(self, slot: int) -> int:
        """Byte offset of ``slot`` in :attr:`buffer`."""
        return slot * self.slot_bytes

    def view(self, slot: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of ``slot`` as a 1-D ``uint8`` view (no copy)."""
        if nbytes == self.slot_bytes:
            # Whole-slot views (the common case: slot size == chunk size) are made once and reused.
            view = self._views.get(slot)
            if view is None:
                view = self._views[slot] = self.buffer.narrow(0, slot * self.slot_bytes, nbytes)
            return view
        return self.buffer.narrow(0, slot * self.slot_bytes, nbytes)

    def _pin_segment(self, first_slot: int) -> None:
        start = first_slot * self.slot_bytes
        length = min(self._segment_slots, self.num_slots - first_slot) * self.slot_bytes
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
        """Unpin what was pinned and drop the buffer reference."""
        if self._pinned_segments:
            try:
                cudart = torch.cuda.cudart()
                base = self.buffer.data_ptr()
                for start in self._pinned_segments:
                    cudart.cudaHostUnregister(base + start)
            except Exception as exc:  # best effort at shutdown
                log.warning("host pool: unpinning failed: %s", exc)
            self._pinned_segments.clear()
        self._free.clear()
        self._views.clear()
        self._fresh = self.num_slots
        self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
