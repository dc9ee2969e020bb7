"""Building a Store's tiers from the config: which tiers, how large, over which memory.

Kept apart from :mod:`kvstrata.kvstore.store` so that the Store itself knows only the ``Tier`` contract,
never the concrete tiers (the device tier imports CUDA helpers, the disk tier the file format).
"""

from __future__ import annotations

import os

import torch

from kvstrata.config import StoreConfig, default_cache_dir
from kvstrata.kvstore.tier import Tier

__all__ = ["available_memory_bytes", "tiers_from_config"]


def available_memory_bytes() -> int:
    """RAM available to new allocations: ``MemAvailable`` of /proc/meminfo, else free pages (sysconf)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return 0


def tiers_from_config(config: StoreConfig, *, host_buffer: torch.Tensor | None = None) -> list[Tier]:
    """The device, host and disk tiers that ``config`` turns on, top first.

    ``host_buffer`` (optional): a caller-owned 1-D ``uint8`` CPU tensor (e.g. POSIX shared memory for the
    ``shm`` transport) to carve the host tier's pool from; its size then bounds the host tier.
    """
    from kvstrata.kvstore.device import DeviceTier, resolve_device
    from kvstrata.kvstore.disk import DiskTier
    from kvstrata.kvstore.host import HostTier

    tiers: list[Tier] = []
    slot = config.slot_bytes
    if config.device_cache_bytes > 0:
        device = resolve_device(config.device)
        # "auto" without CUDA would only duplicate the host tier in host memory: leave it out.
        if device.type != "cpu" or config.device != "auto":
            tiers.append(DeviceTier(config.device_cache_bytes, slot, device=device, policy=config.eviction))
    host_bytes = config.host_cache_bytes
    if host_bytes == 0:
        host_bytes = int(available_memory_bytes() * config.host_cache_fraction)
    if host_buffer is not None:
        host_bytes = min(max(host_bytes, slot), host_buffer.numel())
        tiers.append(HostTier(host_bytes, slot, buffer=host_buffer, policy=config.eviction))
    elif host_bytes > 0:
        # At least one slot; the pool commits pages only as slots come into use.
        tiers.append(HostTier(max(host_bytes, slot), slot, policy=config.eviction))
    if config.disk_cache_bytes > 0:
        directory = config.disk_dir or default_cache_dir()
        tiers.append(
            DiskTier(directory, config.disk_cache_bytes, fsync=config.disk_fsync, policy=config.eviction)
        )
    return tiers
