"""KVLayout: the shape of an engine's KV cache, and the fingerprint that is part of every key.

A chunk made for one layout is never served to another: the layout's fingerprint keys the namespace
(see :mod:`kvstrata.core.keys` and docs/keys.md), so two layouts never share a key.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import msgspec

from kvstrata.errors import LayoutError

__all__ = ["DTYPE_SIZES", "ENGINE_LAYOUTS", "KVLayout"]

#: Bytes per element of each KV dtype kvstrata knows, by torch's name for it.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}

#: Engine memory layouts of a per-layer paged KV tensor (the names kvstrata.kernels understands; a chunk's
#: header stores the index in this tuple, so new names are appended, never inserted; docs/kernels.md):
#: - ``kv_first_nhd``:  (2, num_blocks, block_size, num_kv_heads, head_size)  (vLLM FlashAttention)
#: - ``kv_first_hnd``:  (2, num_blocks, num_kv_heads, block_size, head_size)
#: - ``kv_second_nhd``: (num_blocks, 2, block_size, num_kv_heads, head_size)  (vLLM FlashInfer)
#: - ``kv_second_hnd``: (num_blocks, 2, num_kv_heads, block_size, head_size)
#: - ``cpu_packed``:    (num_blocks, num_kv_heads, block_size, 2 * head_size)  (vLLM CPU; opaque blocks:
#:   K and V are packed inside a block in a dtype-dependent way, so blocks move as bytes and cannot be
#:   quantised)
ENGINE_LAYOUTS: tuple[str, ...] = (
    "kv_first_nhd",
    "kv_first_hnd",
    "kv_second_nhd",
    "kv_second_hnd",
    "cpu_packed",
)


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of one engine's KV cache for one TP rank.

    ``chunk_bytes`` is the size of one full chunk (all layers, K and V, ``chunk_tokens`` tokens) in the
    cache dtype; compressed codecs store less.
    """

    num_layers: Annotated[int, msgspec.Meta(gt=0)]
    num_kv_heads: Annotated[int, msgspec.Meta(gt=0)]
    head_size: Annotated[int, msgspec.Meta(gt=0)]
    dtype: str = "float16"
    block_size: Annotated[int, msgspec.Meta(gt=0)] = 16
    chunk_tokens: Annotated[int, msgspec.Meta(gt=0)] = 256
    tp_rank: Annotated[int, msgspec.Meta(ge=0)] = 0
    tp_size: Annotated[int, msgspec.Meta(gt=0)] = 1
    engine_layout: str = "kv_first_nhd"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise LayoutError(f"unknown KV dtype {self.dtype!r}; known: {sorted(DTYPE_SIZES)}")
        if self.chunk_tokens % self.block_size:
            raise LayoutError(
                f"chunk_tokens ({self.chunk_tokens}) must be a multiple of block_size ({self.block_size})"
            )
        if self.tp_rank >= self.tp_size:
            raise LayoutError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if self.engine_layout not in ENGINE_LAYOUTS:
            raise LayoutError(f"unknown engine layout {self.engine_layout!r}; known: {ENGINE_LAYOUTS}")

    @property
    def itemsize(self) -> int:
        """Bytes per element of the cache dtype."""
        return DTYPE_SIZES[self.dtype]

    @property
    def blocks_per_chunk(self) -> int:
        """Engine blocks in one chunk."""
        return self.chunk_tokens // self.block_size

    @property
    def token_bytes(self) -> int:
        """Bytes of KV for one token across all layers (K and V)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of KV for one engine block across all layers."""
        return self.token_bytes * self.block_size

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one full chunk, uncompressed."""
        return self.token_bytes * self.chunk_tokens

    def canonical(self) -> bytes:
        """The canonical text the fingerprint hashes (docs/keys.md, section "Layout fingerprint")."""
        return (
            "kvstrata-layout-v1"
            f"|num_layers={self.num_layers}|num_kv_heads={self.num_kv_heads}|head_size={self.head_size}"
            f"|dtype={self.dtype}|block_size={self.block_size}|chunk_tokens={self.chunk_tokens}"
            f"|tp_rank={self.tp_rank}|tp_size={self.tp_size}|engine_layout={self.engine_layout}"
        ).encode()

    @property
    def fingerprint(self) -> bytes:
        """A stable 16-byte digest of the layout: BLAKE2b-128 of :meth:`canonical`."""
        return hashlib.blake2b(self.canonical(), digest_size=16).digest()
