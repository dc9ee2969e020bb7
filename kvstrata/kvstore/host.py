"""``HostTier``: chunks in slab-allocated slots of one host-memory buffer (page-locked when CUDA is present).

Chunks of any size up to ``slot_bytes`` share the buffer: it is cut into pages of ``slot_bytes``, and each
page into slots of one power-of-two size class (:mod:`kvstrata.kvstore.pool`), so a tier of ``N`` bytes
holds about ``N / 256 KiB`` chunks of 256 KiB, not ``N / slot_bytes``.

The buffer is allocated once (``torch.empty``: pages are committed as they come into use) or handed in by
the caller, e.g. a POSIX shared-memory segment that the ``shm`` transport maps into client processes;
:meth:`HostTier.slot_span` then tells where a pinned chunk's bytes lie in that segment, so transports hand
out offsets instead of copying. Semantics and locking: :mod:`kvstrata.kvstore.memory`.
"""

from __future__ import annotations

import torch

from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.memory import PooledTier
from kvstrata.kvstore.pool import SlotPool

__all__ = ["HostTier"]


class HostTier(PooledTier):
    """A slab pool of ``capacity_bytes // slot_bytes`` pages in host memory; chunks up to ``slot_bytes``.

    ``buffer``: an externally owned contiguous 1-D ``uint8`` CPU tensor of at least ``capacity_bytes``
    (the pool is carved from it and never frees it). ``pin_memory``: page-lock the pool (``None``: when CUDA
    is present). ``policy``: the eviction policy's name (``"lru"`` or ``"s3fifo"``).
    """

    name = "host"

    def __init__(
        self,
        capacity_bytes: int,
        slot_bytes: int,
        *,
        buffer: torch.Tensor | None = None,
        pin_memory: bool | None = None,
        policy: str = "lru",
    ) -> None:
        if buffer is not None and buffer.device.type != "cpu":
            raise InvalidArgumentError(f"a host tier buffer must be in host memory, not on {buffer.device}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        pool = SlotPool(capacity_bytes, slot_bytes, device="cpu", buffer=buffer, pin_memory=pin_memory)
        super().__init__(pool, policy=policy)
