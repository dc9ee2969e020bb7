"""The disk tier's chunk-file format (version 1), specified byte by byte in docs/disk-format.md.

A chunk file is a header zero-padded to a multiple of :data:`HEADER_ALIGN` (so the payload is page-aligned),
then the payload. The header carries the magic, the format version, the checksum algorithm, the key, the
layout fingerprint, the codec, the token count, the block keys, the payload length and checksum, and a
checksum of the header itself. Checksums are XXH3-64 when the optional ``xxhash`` package is installed
(15-40 GiB/s, little beside the I/O), CRC-32 from zlib otherwise; the header records which, so files of
either kind are read by any build that has the algorithm.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstrata.core.chunk import ChunkMeta
from kvstrata.core.keys import KEY_BYTES
from kvstrata.errors import InvalidArgumentError

_xxhash: Any
try:  # optional: a much faster checksum than CRC-32
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

__all__ = [
    "CHECKSUM_CRC32",
    "CHECKSUM_XXH3",
    "FORMAT_VERSION",
    "HEADER_ALIGN",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "DiskChunkHeader",
    "Hasher",
    "available_checksums",
    "checksum",
    "checksum_name",
    "decode_header",
    "default_checksum",
    "encode_header",
]

#: First 8 bytes of every chunk file.
MAGIC = b"KVSCHUNK"
#: Version of the file format (docs/disk-format.md); files of another version are dropped at start-up.
FORMAT_VERSION = 1
#: Checksum algorithm ids stored in the header.
CHECKSUM_CRC32 = 1
CHECKSUM_XXH3 = 2
#: The header is zero-padded to a multiple of this, so the payload starts page-aligned.
HEADER_ALIGN = 4096
#: Bound on the header (hence on the block keys of one chunk), checked before anything is allocated.
MAX_HEADER_BYTES = 1024 * 1024
#: magic, version, checksum id, fingerprint length, header length, key, fingerprint, codec, payload length,
#: payload checksum, tokens, block-key count, header checksum, reserved — 128 bytes, little-endian.
_FIXED = struct.Struct("<8sHBBI16s16s16sQQIIQ32x")
_HEADER_SUM_AT = 88  # the header checksum covers bytes [0, 88) and the block keys


def default_checksum() -> int:
    """The algorithm new files get: XXH3-64 when ``xxhash`` is installed, CRC-32 otherwise."""
    return CHECKSUM_XXH3 if _xxhash is not None else CHECKSUM_CRC32


def checksum_name(algorithm: int) -> str:
    """A readable name of a checksum algorithm id."""
    return {CHECKSUM_CRC32: "crc32", CHECKSUM_XXH3: "xxh3-64"}.get(algorithm, f"unknown-{algorithm}")


def available_checksums() -> frozenset[int]:
    """The checksum algorithms this build can verify."""
    return frozenset({CHECKSUM_CRC32} | ({CHECKSUM_XXH3} if _xxhash is not None else set()))


class Hasher:
    """Incremental checksum of one algorithm, as a 64-bit integer."""

    __slots__ = ("_crc", "_xxh")

    def __init__(self, algorithm: int) -> None:
        self._crc = 0
        self._xxh = _xxhash.xxh3_64() if algorithm == CHECKSUM_XXH3 and _xxhash is not None else None

    def update(self, data: memoryview | bytes) -> None:
        """Feed the next bytes."""
        if self._xxh is not None:
            self._xxh.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int:
        """The checksum of everything fed so far."""
        return self._xxh.intdigest() if self._xxh is not None else self._crc


def checksum(algorithm: int, *parts: memoryview | bytes) -> int:
    """The checksum of ``parts`` concatenated."""
    if len(parts) == 1 and algorithm == CHECKSUM_XXH3 and _xxhash is not None:
        return int(_xxhash.xxh3_64_intdigest(parts[0]))  # the common case, without a hasher object
    hasher = Hasher(algorithm)
    for part in parts:
        hasher.update(part)
    return hasher.value()


def encode_header(key: bytes, meta: ChunkMeta, payload_len: int, payload_sum: int, algorithm: int) -> bytes:
    """The header of a chunk file, padded to :data:`HEADER_ALIGN` (see docs/disk-format.md)."""
    fingerprint = meta.fingerprint
    codec = meta.codec.encode("ascii", "strict") if meta.codec.isascii() else b"\xff" * 17
    if len(fingerprint) > 16:
        raise InvalidArgumentError(f"a layout fingerprint is at most 16 bytes, got {len(fingerprint)}")
    if len(codec) > 16:
        raise InvalidArgumentError(f"a codec name is at most 16 ASCII characters, got {meta.codec!r}")
    if not 0 <= meta.num_tokens < 2**32:
        raise InvalidArgumentError(f"num_tokens out of range: {meta.num_tokens}")
    if any(len(b) != KEY_BYTES for b in meta.block_keys):
        raise InvalidArgumentError(f"block keys are {KEY_BYTES} bytes each")
    blocks = b"".join(meta.block_keys)
    header_len = -(-(_FIXED.size + len(blocks)) // HEADER_ALIGN) * HEADER_ALIGN
    if header_len > MAX_HEADER_BYTES:
        raise InvalidArgumentError(f"too many block keys for one chunk: {len(meta.block_keys)}")
    fixed = bytearray(
        _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            algorithm,
            len(fingerprint),
            header_len,
            key,
            fingerprint,
            codec,
            payload_len,
            payload_sum,
            meta.num_tokens,
            len(meta.block_keys),
            0,
        )
    )
    header_sum = checksum(algorithm, memoryview(fixed)[:_HEADER_SUM_AT], blocks)
    struct.pack_into("<Q", fixed, _HEADER_SUM_AT, header_sum)
    return bytes(fixed) + blocks + bytes(header_len - _FIXED.size - len(blocks))


@dataclass(frozen=True, slots=True)
class DiskChunkHeader:
    """A decoded, verified chunk-file header."""

    key: bytes
    meta: ChunkMeta
    header_len: int
    payload_len: int
    payload_sum: int
    algorithm: int


def decode_header(read: Callable[[int, int], bytes]) -> DiskChunkHeader:
    """Parse and verify a header; ``read(offset, length)`` returns bytes of the file (maybe fewer).

    Raises :class:`ValueError` when the header is truncated, of another format or version, or corrupt.
    """
    fixed = read(0, _FIXED.size)
    if len(fixed) < _FIXED.size:
        raise ValueError("truncated header")
    (magic, version, algorithm, fp_len, header_len, key, fingerprint, codec, payload_len, payload_sum,
     num_tokens, num_blocks, header_sum) = _FIXED.unpack(fixed)  # fmt: skip
    if magic != MAGIC:
        raise ValueError("not a kvstrata chunk file")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}, this build reads {FORMAT_VERSION}")
    if algorithm not in available_checksums():
        raise ValueError(f"checksum algorithm {algorithm} is unknown or unavailable")
    blocks_len = num_blocks * KEY_BYTES
    if (
        fp_len > 16
        or header_len % HEADER_ALIGN
        or not _FIXED.size + blocks_len <= header_len <= MAX_HEADER_BYTES
    ):
        raise ValueError("header lengths out of range")
    blocks = read(_FIXED.size, blocks_len) if blocks_len else b""
    if len(blocks) < blocks_len:
        raise ValueError("truncated header")
    if checksum(algorithm, fixed[:_HEADER_SUM_AT], blocks) != header_sum:
        raise ValueError("header checksum mismatch")
    try:
        codec_name = codec.rstrip(b"\x00").decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError("codec name is not ASCII") from exc
    meta = ChunkMeta(
        block_keys=tuple(blocks[i : i + KEY_BYTES] for i in range(0, blocks_len, KEY_BYTES)),
        fingerprint=fingerprint[:fp_len],
        codec=codec_name,
        num_tokens=num_tokens,
    )
    return DiskChunkHeader(key, meta, header_len, payload_len, payload_sum, algorithm)
