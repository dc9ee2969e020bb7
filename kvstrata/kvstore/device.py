"""``DeviceTier``: chunks in slab-allocated slots of one buffer in a torch device's memory (a GPU pool).

Chunks of any size up to ``slot_bytes`` share the buffer in power-of-two size classes
(:mod:`kvstrata.kvstore.pool`).

``device="auto"`` picks CUDA when present and falls back to the CPU, where the same code runs in tests.
Copies to and from the pool are plain ``copy_`` calls, synchronous with respect to the caller, so a
returned chunk is complete. Semantics and locking: :mod:`kvstrata.kvstore.memory`.
"""

from __future__ import annotations

import torch

from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.memory import PooledTier
from kvstrata.kvstore.pool import SlotPool

__all__ = ["DeviceTier", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the current CUDA device when present, else the CPU; other names as torch reads them."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"unknown torch device {device!r}") from exc


class DeviceTier(PooledTier):
    """A slab pool of ``capacity_bytes // slot_bytes`` pages in the memory of ``device``; chunks up to
    ``slot_bytes``."""

    name = "device"

    def __init__(
        self,
        capacity_bytes: int,
        slot_bytes: int,
        *,
        device: str | torch.device = "auto",
        policy: str = "lru",
    ) -> None:
        dev = resolve_device(device)
        try:
            pool = SlotPool(capacity_bytes, slot_bytes, device=dev)
        except (RuntimeError, AssertionError) as exc:  # out of memory; a torch built without that device
            raise InvalidArgumentError(f"cannot allocate {capacity_bytes} bytes on {dev}: {exc}") from exc
        self.device = pool.device
        super().__init__(pool, policy=policy)
