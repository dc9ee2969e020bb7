"""fp8/int8 codecs fused into gather and scatter: Triton against the reference, and error bounds."""

from __future__ import annotations

import pytest
import torch

from kvstrata.errors import UnsupportedLayoutError
from kvstrata.kernels import chunk_spec, gather, read_header, scatter
from kvstrata.kernels.reference import dequantise_rows, quantise_rows
from tests.kernels.helpers import SPLIT_LAYOUTS, block_of, make_caches, realistic_kv

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _assert_fp8_within_one_step(got: torch.Tensor, want: torch.Tensor, device: torch.device) -> None:
    """e4m3 codes of one sign are ordered by magnitude: neighbours differ by one in the low 7 bits.

    Triton's interpreter (not the compiled kernel) forgets to carry into the exponent when x rounds up to
    the next power of two, giving half the value (128 -> 64: the code drops by exactly one binade, 8); that
    one defect is tolerated on CPU only.
    """
    a, b = got.view(torch.uint8).int(), want.view(torch.uint8).int()
    same_sign = (a & 0x80) == (b & 0x80)
    near_zero = ((a & 0x7F) <= 1) & ((b & 0x7F) <= 1)
    assert bool((same_sign | near_zero).all())
    step = (a & 0x7F) - (b & 0x7F)
    ok = step.abs() <= 1
    if device.type == "cpu":
        ok |= (step == -8) & ((b & 0x07) == 0)
    assert bool(ok.all()), f"{int((~ok).sum())} fp8 values differ by more than one step"


def _assert_cache_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal, or for bfloat16 within one unit in the last place (the interpreter truncates fp32 -> bf16)."""
    if got.dtype != torch.bfloat16:
        assert torch.equal(got, want)
        return
    g, w = got.float(), want.float()
    assert bool(((g - w).abs() <= w.abs() * 2.0**-7 + 1e-30).all())


@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", SPLIT_LAYOUTS)
def test_fused_codecs_match_reference(
    layout: str, dtype: torch.dtype, codec: str, device: torch.device
) -> None:
    caches = make_caches(layout, dtype=dtype, device=device, seed=11)
    ids = [2, 4]
    chunk = gather(caches, ids, engine_layout=layout, codec=codec, backend="triton").cpu()
    expected = gather(caches, ids, engine_layout=layout, codec=codec, backend="torch").cpu()
    spec = chunk_spec(caches, layout, len(ids), codec)
    assert read_header(chunk).codec == codec
    assert chunk.numel() == spec.total_bytes < chunk_spec(caches, layout, len(ids)).total_bytes
    for layer in range(len(caches)):
        base = spec.layer_offset(layer)
        values = slice(base, base + spec.value_bytes)
        scales = slice(base + spec.scale_offset, base + spec.scale_offset + spec.scale_bytes)
        assert torch.equal(chunk[scales], expected[scales])
        if codec == "int8":
            assert torch.equal(chunk[values], expected[values])
        else:
            _assert_fp8_within_one_step(chunk[values], expected[values], device)

    # Decoding: the same chunk scattered by either backend gives the same cache contents.
    targets = [0, 3]
    dst = [torch.zeros_like(c) for c in caches]
    ref = [torch.zeros_like(c) for c in caches]
    scatter(expected.to(device), dst, targets, engine_layout=layout, backend="triton")
    scatter(expected.to(device), ref, targets, engine_layout=layout, backend="torch")
    for src, got, want in zip(caches, dst, ref, strict=True):
        _assert_cache_close(got.cpu(), want.cpu())
        assert not block_of(got, layout, 1).float().abs().sum()
        for block, target in zip(ids, targets, strict=True):
            original, decoded = block_of(src, layout, block).float(), block_of(got, layout, target).float()
            assert torch.allclose(decoded, original, rtol=0.07, atol=0.1)


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_round_trip_error_bounds_on_realistic_kv(codec: str) -> None:
    gen = torch.Generator().manual_seed(7)
    x = realistic_kv(4096, 128, gen)
    q, scale = quantise_rows(x, codec)
    y = dequantise_rows(q, scale, torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True)
    err = (y - x).abs()
    if codec == "int8":
        # Round to nearest: at most half a step of amax / 127 per element.
        assert bool((err <= amax / 254 * (1 + 1e-5)).all())
        rel = 0.03
    else:
        # e4m3 keeps 3 mantissa bits: half a unit is 2**-4 of the value, or 2**-10 of a step below 2**-6.
        bound = torch.maximum(x.abs() * 2.0**-4, scale.unsqueeze(1) * 2.0**-10)
        assert bool((err <= bound * (1 + 1e-5)).all())
        rel = 0.05
    assert float(err.norm() / x.norm()) < rel
    # The outlier channels survive: the largest value of each row comes back exactly (it defines the scale).
    top = x.abs().argmax(dim=1, keepdim=True)
    assert torch.allclose(y.gather(1, top), x.gather(1, top), rtol=1e-6)


def test_zero_rows_decode_to_zero(device: torch.device) -> None:
    caches = [torch.zeros(2, 3, 16, 2, 16, dtype=torch.float16, device=device)]
    chunk = gather(caches, [1], engine_layout="kv_first_nhd", codec="int8", backend="triton")
    dst = [torch.full_like(caches[0], 5.0)]
    scatter(chunk, dst, [2], engine_layout="kv_first_nhd", backend="triton")
    assert not dst[0][:, 2].any()
    assert bool((dst[0][:, :2] == 5).all())


def test_codecs_refuse_layouts_they_cannot_encode() -> None:
    packed = make_caches("cpu_packed", dtype=torch.float32, one_buffer=True)
    with pytest.raises(UnsupportedLayoutError, match="cpu_packed"):
        gather(packed, [0], engine_layout="cpu_packed", codec="fp8")
    fp8_cache = make_caches("kv_first_nhd", dtype=torch.float8_e4m3fn)
    with pytest.raises(UnsupportedLayoutError, match="float8_e4m3fn"):
        gather(fp8_cache, [0], engine_layout="kv_first_nhd", codec="int8")
