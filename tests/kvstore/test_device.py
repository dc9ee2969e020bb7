"""DeviceTier: device selection, and the pool on the CPU device (the CUDA path is the same code)."""

from __future__ import annotations

import pytest
import torch

from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.device import DeviceTier, resolve_device
from tests.kvstore.conformance_tier import chunk_key, pattern

SLOT = 4096


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InvalidArgumentError):
        resolve_device("no-such-device")


def test_cpu_device_round_trip_and_views() -> None:
    tier = DeviceTier(4 * SLOT, SLOT, device="cpu")
    assert tier.device == torch.device("cpu") and tier.buffer.device == tier.device
    key = chunk_key(1)
    data = pattern(key, SLOT)
    tier.put(key, data)
    got = tier.get(key)
    assert got is not None and torch.equal(got, data) and got.device == tier.device
    with tier.acquire(key) as handle:  # type: ignore[union-attr]
        assert tier.buffer.data_ptr() <= handle.data.data_ptr() < tier.buffer.data_ptr() + tier.capacity_bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_typed_error() -> None:
    with pytest.raises(InvalidArgumentError):
        DeviceTier(4 * SLOT, SLOT, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pool_round_trip_from_and_to_host() -> None:
    tier = DeviceTier(4 * SLOT, SLOT, device="cuda")
    key = chunk_key(2)
    data = pattern(key, SLOT)
    tier.put(key, data)  # host -> device
    out = torch.empty(SLOT, dtype=torch.uint8)
    got = tier.get(key, out=out)  # device -> host, synchronous
    assert got is not None and torch.equal(out, data)
    on_device = tier.get(key)
    assert on_device is not None and on_device.is_cuda and torch.equal(on_device.cpu(), data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_host_tier_feeds_a_device_tier() -> None:
    from kvstrata.kvstore.host import HostTier
    from kvstrata.kvstore.store import Store

    host = HostTier(8 * SLOT, SLOT)  # page-locked lazily when CUDA is present
    assert host._pool.pinned
    store = Store([DeviceTier(2 * SLOT, SLOT, device="cuda"), host], high_watermark=1.0, low_watermark=1.0)
    try:
        keys = [chunk_key(i) for i in range(6)]
        for key in keys:
            store.put(key, pattern(key, SLOT))
        assert host.contains(keys[0]), "device victims were demoted into the pinned host pool"
        got = store.get(keys[0], out=torch.empty(SLOT, dtype=torch.uint8))
        assert got is not None and torch.equal(got, pattern(keys[0], SLOT))
    finally:
        store.close()
