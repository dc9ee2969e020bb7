"""Triton paged gather/scatter (codec ``none``): all layers and blocks of a chunk in one launch.

One program moves one tile of one (layer, K-or-V, block) slab. The layers need not be one allocation: the
kernel takes layer 0's tensor as its base pointer and a small device array of each layer's element offset
from it (cached per set of layers), so an engine's separately allocated per-layer tensors and vLLM's views
of one buffer both work without a per-layer launch. Offsets are stored in units of 16 words when they allow
it, so the compiler can prove 16-word alignment and emit vector loads and stores.

Bytes are moved as integers of the widest word (4, 2 or 1 bytes) that divides every stride and offset, so
any cache dtype, fp8 included, is copied bit for bit. Import this module only through
:mod:`kvstrata.kernels.dispatch` (it imports triton, and ``TRITON_INTERPRET`` must be set before that on a
machine without a GPU).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from kvstrata.kernels.codec import HEADER_BYTES, ChunkSpec
from kvstrata.kernels.paged import PagedCaches

__all__ = ["gather", "layer_offsets_tensor", "scatter"]

_WORDS = {4: torch.int32, 2: torch.int16, 1: torch.int8}
# Elements one program moves; 8 KiB of int32 is 16 words (4 x 16-byte vectors) per thread at 4 warps.
_TILE_WORDS = 2048
_OFFSETS_CACHE: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()
_OFFSETS_CACHE_SIZE = 64
_OFFSETS_LOCK = threading.Lock()


@triton.jit
def _gather_kernel(  # type: ignore[no-untyped-def]  # triton kernel: parameters typed by triton
    cache,  # layer 0's cache, as words
    layer_offs,  # int64 [layers]: word offset of each layer from layer 0, in units of UNIT words
    ids,  # int64 [num_blocks]: engine block ids
    chunk,  # the chunk payload (after the header), as words
    num_blocks,
    block_stride,
    kv_stride,
    run,
    layer_stride,
    first_layer,
    NUM_KV: tl.constexpr,
    UNIT: tl.constexpr,
    TILE: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    j = r % num_blocks
    kv = (r // num_blocks) % NUM_KV
    layer = r // (num_blocks * NUM_KV)
    block = tl.load(ids + j)
    src = tl.load(layer_offs + layer) * UNIT + block * block_stride + kv * kv_stride
    dst = (first_layer + layer) * layer_stride + (kv * num_blocks + j) * run
    offs = t * TILE + tl.arange(0, TILE)
    mask = offs < run
    values = tl.load(cache + src + offs, mask=mask)
    tl.store(chunk + dst + offs, values, mask=mask)


@triton.jit
def _scatter_kernel(  # type: ignore[no-untyped-def]  # triton kernel: parameters typed by triton
    cache,
    layer_offs,
    ids,
    chunk,
    num_blocks,
    block_stride,
    kv_stride,
    run,
    layer_stride,
    first_layer,
    NUM_KV: tl.constexpr,
    UNIT: tl.constexpr,
    TILE: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    j = r % num_blocks
    kv = (r // num_blocks) % NUM_KV
    layer = r // (num_blocks * NUM_KV)
    block = tl.load(ids + j)
    dst = tl.load(layer_offs + layer) * UNIT + block * block_stride + kv * kv_stride
    src = (first_layer + layer) * layer_stride + (kv * num_blocks + j) * run
    offs = t * TILE + tl.arange(0, TILE)
    # A negative id marks a block the engine already holds: it is not written (and not read).
    mask = (offs < run) & ((offs * 0 + block) >= 0)
    values = tl.load(chunk + src + offs, mask=mask)
    tl.store(cache + dst + offs, values, mask=mask)


def layer_offsets_tensor(caches: PagedCaches, scale: int) -> tuple[torch.Tensor, int]:
    """The device array of layer offsets in units of ``scale`` elements, and the unit (16 or 1) it uses.

    Cached per (device, offsets): an engine registers its caches once, so this costs one small upload.
    """
    scaled = [off // scale for off in caches.layer_offsets]
    unit = 16 if all(off % 16 == 0 for off in scaled) else 1
    values = tuple(off // unit for off in scaled)
    key = (str(caches.device), values)
    with _OFFSETS_LOCK:  # the connector saves and loads from different threads
        tensor = _OFFSETS_CACHE.get(key)
        if tensor is not None:
            _OFFSETS_CACHE.move_to_end(key)
            return tensor, unit
    tensor = torch.tensor(values, dtype=torch.int64).to(caches.device)
    with _OFFSETS_LOCK:
        _OFFSETS_CACHE[key] = tensor
        while len(_OFFSETS_CACHE) > _OFFSETS_CACHE_SIZE:
            _OFFSETS_CACHE.popitem(last=False)
    return tensor, unit


def _word_bytes(caches: PagedCaches, spec: ChunkSpec, chunk: torch.Tensor) -> int:
    """The widest word that divides every byte distance the kernel computes."""
    isz = caches.itemsize
    distances = [
        caches.block_stride * isz,
        caches.kv_stride * isz,
        spec.run_elems * isz,
        spec.layer_stride,
        caches.layers[0].data_ptr(),
        chunk.data_ptr() + HEADER_BYTES,
        *(off * isz for off in caches.layer_offsets),
    ]
    for width in (4, 2, 1):
        if all(d % width == 0 for d in distances):
            return width
    return 1  # pragma: no cover - width 1 always divides


def _launch(
    kernel: triton.runtime.jit.JITFunction,
    caches: PagedCaches,
    block_ids: torch.Tensor,
    spec: ChunkSpec,
    chunk: torch.Tensor,
    first_layer: int,
) -> None:
    width = _word_bytes(caches, spec, chunk)
    word = _WORDS[width]
    # Every distance is a multiple of the element size (the chunk is 16-byte aligned), so width >= itemsize
    # and the distances below, counted in words, are exact.
    scale_elems = width // caches.itemsize
    # A one-word alias of layer 0 (same address, word dtype): the kernel only needs its address and type,
    # and as_strided never copies (a reshape of a strided cache could, and the kernel would write a copy).
    cache_words = torch.as_strided(caches.layers[0], (scale_elems,), (1,)).view(torch.uint8).view(word)
    payload = chunk[HEADER_BYTES : HEADER_BYTES + spec.payload_bytes].view(word)
    offsets, unit = layer_offsets_tensor(caches, scale_elems)
    ids = block_ids.to(caches.device, non_blocking=True)
    run = spec.run_elems // scale_elems
    tile = min(_TILE_WORDS, triton.next_power_of_2(run))
    grid = (len(caches.layers) * spec.num_runs, triton.cdiv(run, tile))
    on_cuda = caches.device.type == "cuda"
    with torch.cuda.device(caches.device) if on_cuda else contextlib.nullcontext():
        kernel[grid](
            cache_words,
            offsets,
            ids,
            payload,
            spec.num_blocks,
            caches.block_stride // scale_elems,
            caches.kv_stride // scale_elems,
            run,
            spec.layer_stride // width,
            first_layer,
            NUM_KV=spec.num_kv,
            UNIT=unit,
            TILE=tile,
            num_warps=4,
        )


def gather(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor, first_layer: int
) -> None:
    """Copy the slabs of ``block_ids`` of every layer of ``caches`` into the chunk, in one launch."""
    _launch(_gather_kernel, caches, block_ids, spec, chunk, first_layer)


def scatter(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor, first_layer: int
) -> None:
    """Copy the chunk's slabs into ``block_ids`` of every layer of ``caches``, in one launch."""
    _launch(_scatter_kernel, caches, block_ids, spec, chunk, first_layer)
