"""The chunk format: a 64-byte header, then one section per layer (specified in docs/kernels.md).

A chunk buffer made by :func:`kvstrata.kernels.gather` is self-describing: its header records the codec
(``none``, ``fp8``, ``int8``), the engine layout and the geometry, so a reader always knows how to decode it
and refuses a chunk that does not fit the cache it is asked to fill.

Layout of a chunk of ``B`` blocks (all little-endian)::

    [header: 64 bytes][layer 0 section][layer 1 section]...[layer L-1 section]

Every layer section is ``layer_stride`` bytes (a multiple of 16, so every section and every scale array
is aligned for vector loads). Inside a section, for the K/V-split engine layouts::

    codec none:    values[kv in (K, V)][block j in 0..B-1][run]     run = one (block, kv) slab of the
                                                                     engine, in its own order (NHD or HND)
    codec fp8/int8: qvalues[kv][block][run] (1 byte each), then
                    scales[kv][block][row] (float32)                row = one (token, head) vector of
                                                                     head_size values

and for ``cpu_packed`` (K and V packed inside a block in a dtype-dependent way) a section is
``block[j]`` as opaque bytes, codec ``none`` only.

Call order: :meth:`ChunkSpec.header` then :meth:`ChunkHeader.pack` when writing;
:meth:`ChunkHeader.unpack` (raises :class:`ChunkFormatError` on anything malformed) and
:meth:`ChunkSpec.check_header` when reading.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from kvstrata.core.layout import ENGINE_LAYOUTS
from kvstrata.errors import ChunkFormatError, InvalidArgumentError, LayoutError

__all__ = [
    "ALIGN",
    "CODECS",
    "HEADER_BYTES",
    "KV_DTYPES",
    "QMAX",
    "ChunkHeader",
    "ChunkSpec",
]

#: The codecs a chunk may be encoded with; the header stores the index in this tuple.
CODECS: tuple[str, ...] = ("none", "fp8", "int8")

#: Largest magnitude a quantised value takes: float8 e4m3fn's largest finite value, and int8 symmetric.
QMAX: dict[str, float] = {"fp8": 448.0, "int8": 127.0}

#: Cache dtypes the kernels move, by torch name; the header stores the index in this tuple.
KV_DTYPES: tuple[str, ...] = (
    "float16",
    "bfloat16",
    "float32",
    "float8_e4m3fn",
    "float8_e5m2",
    "uint8",
    "int8",
)

#: Dtypes that can be quantised (the others are already one byte wide).
QUANTISABLE_DTYPES = frozenset({"float16", "bfloat16", "float32"})

HEADER_BYTES = 64
#: Alignment of every layer section and of the scale arrays, in bytes.
ALIGN = 16

_MAGIC = b"KVSC"
_VERSION = 1
# magic, version, codec, dtype, engine layout, num_layers, num_blocks, block_size, num_kv_heads,
# head_size, layer_stride, payload_bytes, 16 reserved bytes, then a CRC-32 of the first 60 bytes.
_STRUCT = struct.Struct("<4sBBBBIIIIIQQ16x")
_CRC = struct.Struct("<I")
assert _STRUCT.size + _CRC.size == HEADER_BYTES


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ChunkHeader:
    """The decoded 64-byte header of a chunk buffer."""

    codec: str
    dtype: str
    engine_layout: str
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    layer_stride: int
    payload_bytes: int

    def pack(self) -> bytes:
        """The 64 header bytes (ending in a CRC-32 of the rest)."""
        body = _STRUCT.pack(
            _MAGIC,
            _VERSION,
            CODECS.index(self.codec),
            KV_DTYPES.index(self.dtype),
            ENGINE_LAYOUTS.index(self.engine_layout),
            self.num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_size,
            self.layer_stride,
            self.payload_bytes,
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ChunkHeader:
        """Decode a header; :class:`ChunkFormatError` when it is short, corrupt, or of another version."""
        raw = bytes(data[:HEADER_BYTES])
        if len(raw) < HEADER_BYTES:
            raise ChunkFormatError(f"chunk too short for its header ({len(raw)} < {HEADER_BYTES} bytes)")
        body, (crc,) = raw[: _STRUCT.size], _CRC.unpack(raw[_STRUCT.size :])
        magic, version, codec, dtype, layout, *numbers = _STRUCT.unpack(body)
        if magic != _MAGIC:
            raise ChunkFormatError(f"not a kvstrata chunk (magic {magic!r})")
        if version != _VERSION:
            raise ChunkFormatError(f"chunk format version {version} is not supported (this is {_VERSION})")
        if zlib.crc32(body) != crc:
            raise ChunkFormatError("chunk header checksum mismatch")
        if codec >= len(CODECS) or dtype >= len(KV_DTYPES) or layout >= len(ENGINE_LAYOUTS):
            raise ChunkFormatError(
                f"chunk header names an unknown codec/dtype/layout ({codec}/{dtype}/{layout})"
            )
        return cls(CODECS[codec], KV_DTYPES[dtype], ENGINE_LAYOUTS[layout], *numbers)


@dataclass(frozen=True)
class ChunkSpec:
    """The geometry of a chunk: where each layer, block and scale sits in the buffer.

    ``run_elems`` is the number of cache elements of one (block, K-or-V) slab (for ``cpu_packed``: one
    whole block); ``num_kv`` is 2 for the K/V-split layouts and 1 for ``cpu_packed``.
    """

    codec: str
    dtype: str
    itemsize: int
    engine_layout: str
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise InvalidArgumentError(f"unknown codec {self.codec!r}; known: {CODECS}")
        if self.engine_layout not in ENGINE_LAYOUTS:
            raise LayoutError(f"unknown engine layout {self.engine_layout!r}; known: {ENGINE_LAYOUTS}")
        if self.dtype not in KV_DTYPES:
            raise LayoutError(f"unknown KV dtype {self.dtype!r}; known: {KV_DTYPES}")
        if min(self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_size) <= 0:
            raise InvalidArgumentError(f"chunk geometry must be positive: {self}")

    @property
    def packed(self) -> bool:
        """True for the opaque-block ``cpu_packed`` layout."""
        return self.engine_layout == "cpu_packed"

    @property
    def num_kv(self) -> int:
        """Slabs per block: 2 (K and V) for split layouts, 1 (the whole opaque block) for cpu_packed."""
        return 1 if self.packed else 2

    @property
    def run_elems(self) -> int:
        """Cache elements in one (block, K-or-V) slab."""
        return self.block_size * self.num_kv_heads * self.head_size * (2 if self.packed else 1)

    @property
    def rows_per_run(self) -> int:
        """(token, head) vectors in one slab: the unit that carries one quantisation scale."""
        return self.block_size * self.num_kv_heads

    @property
    def num_runs(self) -> int:
        """Slabs of one layer in the chunk."""
        return self.num_kv * self.num_blocks

    @property
    def quantised(self) -> bool:
        """True for the fp8 and int8 codecs."""
        return self.codec != "none"

    @property
    def value_bytes(self) -> int:
        """Bytes of one layer's (possibly quantised) values."""
        width = 1 if self.quantised else self.itemsize
        return self.num_runs * self.run_elems * width

    @property
    def scale_offset(self) -> int:
        """Offset of one layer's float32 scales inside its section."""
        return _round_up(self.value_bytes, ALIGN)

    @property
    def scale_bytes(self) -> int:
        """Bytes of one layer's scales (0 for codec none)."""
        return self.num_runs * self.rows_per_run * 4 if self.quantised else 0

    @property
    def layer_stride(self) -> int:
        """Bytes from one layer section to the next."""
        if not self.quantised:
            return _round_up(self.value_bytes, ALIGN)
        return _round_up(self.scale_offset + self.scale_bytes, ALIGN)

    @property
    def payload_bytes(self) -> int:
        """Bytes after the header."""
        return self.num_layers * self.layer_stride

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole chunk buffer, header included."""
        return HEADER_BYTES + self.payload_bytes

    def layer_offset(self, layer: int) -> int:
        """Offset of a layer's section from the start of the chunk buffer."""
        if not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return HEADER_BYTES + layer * self.layer_stride

    def header(self) -> ChunkHeader:
        """The header that describes this chunk."""
        return ChunkHeader(
            codec=self.codec,
            dtype=self.dtype,
            engine_layout=self.engine_layout,
            num_layers=self.num_layers,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            layer_stride=self.layer_stride,
            payload_bytes=self.payload_bytes,
        )

    def check_header(self, header: ChunkHeader) -> None:
        """Raise :class:`LayoutError` unless ``header`` describes a chunk of exactly this geometry."""
        expected = self.header()
        if header != expected:
            diffs = [
                f"{name}={getattr(header, name)!r} (cache needs {getattr(expected, name)!r})"
                for name in expected.__dataclass_fields__
                if getattr(header, name) != getattr(expected, name)
            ]
            raise LayoutError("chunk does not fit the cache: " + ", ".join(diffs))
