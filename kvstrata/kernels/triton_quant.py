"""Triton gather with fused quantisation and scatter with fused dequantisation (codecs ``fp8`` and ``int8``).

One program handles a tile of (token, head) rows of one (layer, K-or-V, block) slab: it loads the rows
once, computes one float32 scale per row (``amax / QMAX``), and writes one byte per value plus the scale
(gather); or reads bytes and scales and writes the cache dtype (scatter). The arithmetic is exactly that
of :mod:`kvstrata.kernels.reference` (IEEE division via ``div_rn``, round half up for int8, round to
nearest even for the e4m3 cast), so int8 matches the reference bit for bit and fp8 within one e4m3 step.
Layers are addressed as in :mod:`kvstrata.kernels.triton_paged`: layer 0's tensor plus an offset array.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kvstrata.kernels.codec import HEADER_BYTES, QMAX, ChunkSpec
from kvstrata.kernels.paged import PagedCaches
from kvstrata.kernels.triton_paged import layer_offsets_tensor

__all__ = ["gather", "scatter"]

# Values one program holds in registers: 4096 fp32 is 32 per thread at 4 warps.
_TILE_VALUES = 4096


@triton.jit
def _gather_quant_kernel(  # type: ignore[no-untyped-def]  # triton kernel: parameters typed by triton
    cache,  # layer 0's cache, in its own float dtype
    layer_offs,  # int64 [layers], in units of UNIT elements
    ids,  # int64 [num_blocks]
    qchunk,  # the chunk payload as int8 or float8_e4m3fn
    schunk,  # the chunk payload as float32
    num_blocks,
    block_stride,
    kv_stride,
    rows,  # (token, head) rows per slab
    layer_stride,  # bytes
    scale_offset,  # bytes, inside a layer section
    first_layer,
    HEAD: tl.constexpr,
    HEAD_P2: tl.constexpr,
    ROWS: tl.constexpr,
    UNIT: tl.constexpr,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    j = r % num_blocks
    kv = (r // num_blocks) % 2
    layer = r // (num_blocks * 2)
    block = tl.load(ids + j)
    src = tl.load(layer_offs + layer) * UNIT + block * block_stride + kv * kv_stride
    row = t * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, HEAD_P2)
    row_mask = row < rows
    mask = row_mask[:, None] & (col < HEAD)[None, :]
    within = row[:, None] * HEAD + col[None, :]
    x = tl.load(cache + src + within, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
    y = tl.math.div_rn(x, scale[:, None])
    if IS_FP8:
        q = tl.minimum(tl.maximum(y, -QMAX), QMAX).to(tl.float8e4nv)
    else:
        q = tl.minimum(tl.maximum(tl.floor(y + 0.5), -QMAX), QMAX).to(tl.int8)
    section = (first_layer + layer) * layer_stride
    slab = kv * num_blocks + j
    tl.store(qchunk + section + slab * rows * HEAD + within, q, mask=mask)
    tl.store(schunk + (section + scale_offset) // 4 + slab * rows + row, scale, mask=row_mask)


@triton.jit
def _scatter_dequant_kernel(  # type: ignore[no-untyped-def]  # triton kernel: parameters typed by triton
    cache,
    layer_offs,
    ids,
    qchunk,
    schunk,
    num_blocks,
    block_stride,
    kv_stride,
    rows,
    layer_stride,
    scale_offset,
    first_layer,
    HEAD: tl.constexpr,
    HEAD_P2: tl.constexpr,
    ROWS: tl.constexpr,
    UNIT: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    j = r % num_blocks
    kv = (r // num_blocks) % 2
    layer = r // (num_blocks * 2)
    block = tl.load(ids + j)
    dst = tl.load(layer_offs + layer) * UNIT + block * block_stride + kv * kv_stride
    row = t * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, HEAD_P2)
    # A negative id marks a block the engine already holds: it is not written (and not read).
    row_mask = (row < rows) & ((row * 0 + block) >= 0)
    mask = row_mask[:, None] & (col < HEAD)[None, :]
    within = row[:, None] * HEAD + col[None, :]
    section = (first_layer + layer) * layer_stride
    slab = kv * num_blocks + j
    q = tl.load(qchunk + section + slab * rows * HEAD + within, mask=mask).to(tl.float32)
    scale = tl.load(schunk + (section + scale_offset) // 4 + slab * rows + row, mask=row_mask, other=1.0)
    x = q * scale[:, None]
    tl.store(cache + dst + within, x.to(cache.dtype.element_ty), mask=mask)


def _args(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor
) -> tuple[tuple[object, ...], dict[str, int], tuple[int, int]]:
    payload = chunk[HEADER_BYTES : HEADER_BYTES + spec.payload_bytes]
    qdtype = torch.float8_e4m3fn if spec.codec == "fp8" else torch.int8
    offsets, unit = layer_offsets_tensor(caches, 1)
    ids = block_ids.to(caches.device, non_blocking=True)
    head_p2 = triton.next_power_of_2(spec.head_size)
    rows_tile = min(triton.next_power_of_2(spec.rows_per_run), max(1, _TILE_VALUES // head_p2))
    positional = (
        caches.layers[0],
        offsets,
        ids,
        payload.view(qdtype),
        payload.view(torch.float32),
        spec.num_blocks,
        caches.block_stride,
        caches.kv_stride,
        spec.rows_per_run,
        spec.layer_stride,
        spec.scale_offset,
    )
    constants = {"HEAD": spec.head_size, "HEAD_P2": head_p2, "ROWS": rows_tile, "UNIT": unit}
    grid = (len(caches.layers) * spec.num_runs, triton.cdiv(spec.rows_per_run, rows_tile))
    return positional, constants, grid


def _device(caches: PagedCaches) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(caches.device) if caches.device.type == "cuda" else contextlib.nullcontext()


def gather(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor, first_layer: int
) -> None:
    """Gather and quantise the slabs of ``block_ids`` of every layer into the chunk, in one launch."""
    positional, constants, grid = _args(caches, block_ids, spec, chunk)
    with _device(caches):
        _gather_quant_kernel[grid](
            *positional,
            first_layer,
            **constants,
            QMAX=QMAX[spec.codec],
            IS_FP8=spec.codec == "fp8",
            num_warps=4,
        )


def scatter(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor, first_layer: int
) -> None:
    """Dequantise the chunk's slabs into ``block_ids`` of every layer of ``caches``, in one launch."""
    positional, constants, grid = _args(caches, block_ids, spec, chunk)
    with _device(caches):
        _scatter_dequant_kernel[grid](*positional, first_layer, **constants, num_warps=4)
