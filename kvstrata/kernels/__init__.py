"""GPU data movement: paged gather/scatter and KV compression (Triton kernels with torch references).

The connector calls one function per operation, for any engine layout of
:data:`kvstrata.core.layout.ENGINE_LAYOUTS`::

    chunk = gather(kv_caches, block_ids, engine_layout="kv_first_nhd", codec="fp8")
    scatter(chunk, kv_caches, other_block_ids, engine_layout="kv_first_nhd")   # codec read from the header

and :func:`gather_layer` / :func:`scatter_layer` for one layer at a time. The chunk format is in
:mod:`kvstrata.kernels.codec` and docs/kernels.md. Triton is imported only when a Triton kernel runs.
"""

from kvstrata.kernels.codec import CODECS, HEADER_BYTES, ChunkHeader, ChunkSpec
from kvstrata.kernels.dispatch import (
    chunk_spec,
    configure,
    gather,
    gather_layer,
    read_header,
    scatter,
    scatter_layer,
    select_backend,
)
from kvstrata.kernels.paged import SKIP_BLOCK, BlockIds, prepare_block_ids

__all__ = [
    "CODECS",
    "HEADER_BYTES",
    "SKIP_BLOCK",
    "BlockIds",
    "ChunkHeader",
    "ChunkSpec",
    "chunk_spec",
    "configure",
    "gather",
    "gather_layer",
    "prepare_block_ids",
    "read_header",
    "scatter",
    "scatter_layer",
    "select_backend",
]
