"""The chunk format: header encoding, corruption detection, geometry and alignment."""

from __future__ import annotations

import pytest

from kvstrata.errors import ChunkFormatError, InvalidArgumentError, LayoutError
from kvstrata.kernels.codec import ALIGN, HEADER_BYTES, ChunkHeader, ChunkSpec


def _spec(**overrides: object) -> ChunkSpec:
    fields: dict[str, object] = {
        "codec": "none",
        "dtype": "bfloat16",
        "itemsize": 2,
        "engine_layout": "kv_first_nhd",
        "num_layers": 32,
        "num_blocks": 16,
        "block_size": 16,
        "num_kv_heads": 8,
        "head_size": 128,
    }
    fields.update(overrides)
    return ChunkSpec(**fields)  # type: ignore[arg-type]


def test_header_round_trip_and_size() -> None:
    for codec in ("none", "fp8", "int8"):
        header = _spec(codec=codec).header()
        raw = header.pack()
        assert len(raw) == HEADER_BYTES
        assert ChunkHeader.unpack(raw) == header
        assert ChunkHeader.unpack(memoryview(raw + b"payload")) == header


def test_every_corrupt_header_byte_is_detected() -> None:
    raw = _spec(codec="fp8").header().pack()
    for i in range(HEADER_BYTES):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        with pytest.raises(ChunkFormatError):
            ChunkHeader.unpack(bytes(bad))
    with pytest.raises(ChunkFormatError, match="short"):
        ChunkHeader.unpack(raw[:10])


def test_geometry_of_a_7b_chunk() -> None:
    # 256 tokens of a 7B-class layout: 32 MiB uncompressed, 1 MiB per layer (docs/kernels.md).
    spec = _spec()
    assert spec.layer_stride == 1024**2 and spec.total_bytes == HEADER_BYTES + 32 * 1024**2
    fp8 = _spec(codec="fp8")
    assert fp8.value_bytes == 512 * 1024 and fp8.scale_bytes == 2 * 16 * 16 * 8 * 4
    assert fp8.layer_stride == fp8.value_bytes + fp8.scale_bytes
    assert fp8.layer_offset(1) == HEADER_BYTES + fp8.layer_stride
    odd = _spec(
        codec="int8", head_size=20, num_blocks=3, block_size=16, num_kv_heads=1, itemsize=4, dtype="float32"
    )
    assert odd.scale_offset % ALIGN == 0 and odd.layer_stride % ALIGN == 0


def test_bad_specs_and_mismatches() -> None:
    with pytest.raises(InvalidArgumentError):
        _spec(codec="zstd")
    with pytest.raises(LayoutError):
        _spec(engine_layout="nope")
    with pytest.raises(InvalidArgumentError):
        _spec(num_blocks=0)
    with pytest.raises(InvalidArgumentError):
        _spec().layer_offset(32)
    with pytest.raises(LayoutError, match="codec='fp8'"):
        _spec().check_header(_spec(codec="fp8").header())
    _spec().check_header(_spec().header())
