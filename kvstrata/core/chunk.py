"""Chunk metadata and pinned-chunk handles: what tiers, transports and the server pass between them.

Keys are 16-byte digests (:attr:`kvstrata.core.keys.ChunkKey.digest`); a chunk is an opaque run of bytes plus
its :class:`ChunkMeta`. A :class:`ChunkHandle` is a pinned chunk, released exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import torch

from kvstrata.core.keys import KEY_BYTES
from kvstrata.errors import InvalidArgumentError

__all__ = ["EMPTY_META", "ChunkHandle", "ChunkMeta", "PrefixResult", "check_key"]


class ChunkMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What a tier keeps beside a chunk's bytes."""

    #: the block keys the chunk covers, reported in events (the index works in blocks)
    block_keys: tuple[bytes, ...] = ()
    #: the KV layout fingerprint the bytes were made for (16 bytes), or empty when not known
    fingerprint: bytes = b""
    #: the compression codec of the bytes: "none", "fp8", "int8"
    codec: str = "none"
    #: tokens covered by the chunk (0 when not known)
    num_tokens: int = 0
    #: the CRC-32C of the bytes when it was checked on the way in (a put over the wire), -1 when not known:
    #: the server answers a get with it instead of reading the whole chunk again, and a client that finds
    #: it does not match the bytes it received (corruption anywhere after the put) takes a miss
    crc32c: int = -1


EMPTY_META = ChunkMeta()


@dataclass(frozen=True, slots=True)
class PrefixResult:
    """How many leading chunks of a lookup are held (``num_chunks``), and for each of them the highest
    tier holding it (``tiers``: "device", "host", "disk", "remote") and, from a client, the URL of the
    server holding it (``servers``; empty from a Store or a single transport)."""

    num_chunks: int
    tiers: tuple[str, ...] = field(default=())
    servers: tuple[str, ...] = field(default=())


class ChunkHandle:
    """A pinned chunk. ``data`` stays valid and unchanged until :meth:`release`."""

    __slots__ = ("_release", "_released", "data", "key", "mem", "meta")

    def __init__(
        self,
        key: bytes,
        data: torch.Tensor,
        meta: ChunkMeta,
        release: Callable[[], None] | None = None,
        mem: memoryview | None = None,
    ) -> None:
        self.key = key
        self.data = data
        self.meta = meta
        #: ``data``'s bytes as a flat memoryview when the tier has one at hand (host memory), else ``None``
        self.mem = mem
        self._release = release
        self._released = False

    def release(self) -> None:
        """Unpin the chunk; idempotent."""
        if not self._released:
            self._released = True
            if self._release is not None:
                self._release()

    def __enter__(self) -> ChunkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_key(key: bytes) -> bytes:
    """Validate a chunk key (16 bytes) and return it as ``bytes``."""
    if not isinstance(key, bytes):
        digest = getattr(key, "digest", None)
        if isinstance(digest, bytes):
            key = digest
        elif isinstance(key, (bytearray, memoryview)):
            key = bytes(key)
        else:
            raise InvalidArgumentError(f"a chunk key is 16 bytes or a ChunkKey, not {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise InvalidArgumentError(f"a chunk key is {KEY_BYTES} bytes, got {len(key)}")
    return key
