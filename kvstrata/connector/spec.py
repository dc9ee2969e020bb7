"""What the connector knows of the engine: the KV layout of each TP rank, the namespaces, the keys.

Keys are kvstrata's (:mod:`kvstrata.core.keys`): token ids chained under a namespace of (model id, the
rank's layout fingerprint, tenant salt), never vLLM's block hashes. So engines with another PYTHONHASHSEED or
prefix-caching hash algorithm share hits, and engines with another dtype, block size, engine layout or TP
size (each part of the fingerprint) never see each other's KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstrata.core.keys import ROOT_PARENT, ExtraKey, Namespace, block_keys
from kvstrata.core.layout import KVLayout
from kvstrata.errors import InvalidArgumentError

__all__ = ["EngineSpec", "KeyChain", "default_chunk_tokens"]

#: The chunk size the connector aims at when none is configured (LMCache's too).
DEFAULT_CHUNK_TOKENS = 256


def default_chunk_tokens(block_size: int, configured: int = 0) -> int:
    """``configured``, or 256 rounded up to a multiple of ``block_size``; always a multiple of it."""
    if block_size <= 0:
        raise InvalidArgumentError("block_size must be positive")
    if configured:
        if configured % block_size:
            raise InvalidArgumentError(
                f"connector.chunk_tokens ({configured}) must be a multiple of the block size ({block_size})"
            )
        return configured
    return -(-DEFAULT_CHUNK_TOKENS // block_size) * block_size


@dataclass(frozen=True)
class EngineSpec:
    """The engine's KV geometry as both connector halves see it (they compute it from the same config)."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str
    block_size: int
    chunk_tokens: int
    tp_size: int
    engine_layout: str
    tenant_salt: str = ""
    layouts: tuple[KVLayout, ...] = field(init=False)
    namespaces: tuple[Namespace, ...] = field(init=False)

    def __post_init__(self) -> None:
        layouts = tuple(
            KVLayout(
                num_layers=self.num_layers,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
                dtype=self.dtype,
                block_size=self.block_size,
                chunk_tokens=self.chunk_tokens,
                tp_rank=rank,
                tp_size=self.tp_size,
                engine_layout=self.engine_layout,
            )
            for rank in range(self.tp_size)
        )
        object.__setattr__(self, "layouts", layouts)
        object.__setattr__(
            self,
            "namespaces",
            tuple(Namespace.for_layout(self.model_id, layout, self.tenant_salt) for layout in layouts),
        )

    @property
    def blocks_per_chunk(self) -> int:
        """Engine blocks in one chunk."""
        return self.chunk_tokens // self.block_size

    def describe(self) -> str:
        """One line for the start-up log."""
        ns = self.namespaces[0].id.hex()
        return (
            f"model={self.model_id!r} layout={self.engine_layout} dtype={self.dtype} "
            f"layers={self.num_layers} kv_heads={self.num_kv_heads} head_size={self.head_size} "
            f"block={self.block_size} chunk={self.chunk_tokens} tp={self.tp_size} namespace={ns}"
        )


class KeyChain:
    """The block keys of one request on every rank, extended as its tokens grow (decode appends).

    Hashing happens once per block: the chain keeps each rank's keys and continues from the last one.
    """

    __slots__ = ("_extras", "_spec", "keys")

    def __init__(self, spec: EngineSpec, extras: Sequence[ExtraKey] = ()) -> None:
        self._spec = spec
        self._extras = tuple(extras)
        #: keys[rank][block]
        self.keys: list[list[bytes]] = [[] for _ in range(spec.tp_size)]

    @property
    def num_blocks(self) -> int:
        """Blocks keyed so far."""
        return len(self.keys[0])

    def extend(self, tokens: Sequence[int], num_blocks: int) -> int:
        """Key blocks up to ``num_blocks`` (as far as ``tokens`` has full blocks); returns how many are."""
        bs = self._spec.block_size
        num_blocks = min(num_blocks, len(tokens) // bs)
        have = self.num_blocks
        if num_blocks <= have:
            return have
        new_tokens = tokens[have * bs : num_blocks * bs]
        for rank, ns in enumerate(self._spec.namespaces):
            parent = self.keys[rank][-1] if have else ROOT_PARENT
            self.keys[rank].extend(block_keys(ns, new_tokens, bs, extra_keys=self._extras, parent=parent))
        return num_blocks

    def chunk_keys(self, chunk: int) -> tuple[bytes, ...]:
        """The key of chunk ``chunk`` (the key of its last block) on every rank; the blocks must be keyed."""
        last = (chunk + 1) * self._spec.blocks_per_chunk - 1
        return tuple(keys[last] for keys in self.keys)

    def chunk_block_keys(self, chunk: int) -> tuple[tuple[bytes, ...], ...]:
        """The block keys of chunk ``chunk`` on every rank."""
        bpc = self._spec.blocks_per_chunk
        return tuple(tuple(keys[chunk * bpc : (chunk + 1) * bpc]) for keys in self.keys)
