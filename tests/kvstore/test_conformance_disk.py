"""The shared Tier conformance suite on DiskTier, directly and through the fault-injecting wrapper."""

from __future__ import annotations

from pathlib import Path

from kvstrata.kvstore.disk import DiskTier
from kvstrata.kvstore.diskformat import HEADER_ALIGN
from kvstrata.kvstore.tier import Tier
from tests.kvstore.conformance_tier import TierConformance
from tests.kvstore.faulty import FaultyTierConformance


class _DiskSizing(TierConformance):
    chunk_bytes = 4096
    _serial = 0

    def capacity_for(self, n: int) -> int:
        # Every file is a 4 KiB header (the suite's chunks carry few block keys) plus its payload.
        return n * (HEADER_ALIGN + self.chunk_bytes)

    def _fresh_dir(self) -> Path:
        _DiskSizing._serial += 1
        return self.tmp_path / f"disk{_DiskSizing._serial}"


class TestDiskTierConformance(_DiskSizing, TierConformance):
    def make_tier(self, capacity_bytes: int) -> Tier:
        return DiskTier(self._fresh_dir(), capacity_bytes)


class TestDiskTierFsyncConformance(_DiskSizing, TierConformance):
    """The same contract with every file and directory entry flushed to stable storage."""

    def make_tier(self, capacity_bytes: int) -> Tier:
        return DiskTier(self._fresh_dir(), capacity_bytes, fsync=True)


class TestDiskTierS3FIFOConformance(_DiskSizing, TierConformance):
    """S3-FIFO instead of LRU: the suite's order checks hold too (none of them reads a key twice)."""

    def make_tier(self, capacity_bytes: int) -> Tier:
        return DiskTier(self._fresh_dir(), capacity_bytes, policy="s3fifo")


class TestDiskTierThroughFaults(_DiskSizing, FaultyTierConformance):
    def make_inner(self, capacity_bytes: int) -> Tier:
        return DiskTier(self._fresh_dir(), capacity_bytes)
