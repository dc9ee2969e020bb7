"""The shared Tier conformance suite run against the memory tiers, directly and through the fault wrapper."""

from __future__ import annotations

import torch

from kvstrata.kvstore.device import DeviceTier
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.tier import Tier
from tests.kvstore.conformance_tier import TierConformance, chunk_key
from tests.kvstore.faulty import FaultyTierConformance


class TestHostTierConformance(TierConformance):
    """HostTier with its own buffer."""

    def make_tier(self, capacity_bytes: int) -> Tier:
        return HostTier(capacity_bytes, slot_bytes=self.chunk_bytes)


class TestHostTierS3FIFOConformance(TierConformance):
    """HostTier with S3-FIFO: the suite's eviction-order checks hold for it too (no key is read twice)."""

    def make_tier(self, capacity_bytes: int) -> Tier:
        return HostTier(capacity_bytes, slot_bytes=self.chunk_bytes, policy="s3fifo")

    def test_pinned_chunk_survives_eviction_unchanged(self) -> None:
        # The suite's version expects recency order once the pin is gone. Under S3-FIFO the acquire was a
        # read, so the chunk sits in the main queue, which a stream of unread puts never reaches (that is
        # S3-FIFO's scan resistance); it must still be listed as a victim once released.
        tier = self.tier(2)
        pinned = chunk_key(21)
        data = self.data(pinned)
        tier.put(pinned, data)
        handle = tier.acquire(pinned)
        assert handle is not None
        try:
            for i in range(6):
                key = chunk_key(200 + i)
                tier.put(key, self.data(key))
                assert tier.used_bytes <= tier.capacity_bytes
            assert tier.contains(pinned), "a pinned chunk is never evicted"
            assert handle.data.numpy().tobytes() == data.numpy().tobytes()
        finally:
            handle.release()
        assert pinned in tier.victims(self.capacity_for(2)), "once released it is evictable again"
        tier.remove(tier.victims(self.capacity_for(1))[0])
        assert tier.victims(self.capacity_for(1)) == [pinned]


class TestHostTierExternalBufferConformance(TierConformance):
    """HostTier carved from a caller-owned buffer (as the shm transport does), larger than needed."""

    def make_tier(self, capacity_bytes: int) -> Tier:
        buffer = torch.empty(capacity_bytes + 12345, dtype=torch.uint8)
        return HostTier(capacity_bytes, slot_bytes=self.chunk_bytes, buffer=buffer)


class TestDeviceTierConformance(TierConformance):
    """DeviceTier on the CPU device (the same code runs on CUDA)."""

    def make_tier(self, capacity_bytes: int) -> Tier:
        return DeviceTier(capacity_bytes, slot_bytes=self.chunk_bytes, device="cpu")


class TestHostTierThroughFaults(FaultyTierConformance):
    """HostTier through the fault-injecting wrapper."""

    def make_inner(self, capacity_bytes: int) -> Tier:
        return HostTier(capacity_bytes, slot_bytes=self.chunk_bytes)


class TestDeviceTierThroughFaults(FaultyTierConformance):
    """DeviceTier (CPU device) through the fault-injecting wrapper."""

    def make_inner(self, capacity_bytes: int) -> Tier:
        return DeviceTier(capacity_bytes, slot_bytes=self.chunk_bytes, device="cpu")
