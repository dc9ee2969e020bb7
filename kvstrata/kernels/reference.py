"""Torch implementations of paged gather/scatter and the fp8/int8 codecs: the CPU path and the tests' oracle.

Each function writes (or reads) the sections of layers ``first_layer .. first_layer + len(caches) - 1`` of a
chunk buffer laid out as :mod:`kvstrata.kernels.codec` describes; the header is the dispatcher's business.
Codec ``none`` moves each (block, K-or-V) slab with one ``index_select``/``index_copy_`` (numpy's ``take``
and row assignment on CPU) straight between the cache and the chunk, reinterpreted as integers of the
cache's width so that every bit pattern (fp8, NaN payloads) survives. The quantising paths compute in
float32 exactly as the Triton kernels do:

- ``scale = amax(|row|) / QMAX`` per (token, head) row (1.0 for an all-zero row),
- int8: ``q = clamp(floor(x / scale + 0.5), -127, 127)``; fp8: ``q = e4m3(clamp(x / scale, -448, 448))``,
- decode: ``x = (float(q) * scale)`` cast to the cache dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from kvstrata.kernels.codec import QMAX, ChunkSpec
from kvstrata.kernels.paged import PagedCaches

__all__ = ["dequantise_rows", "gather", "quantise_rows", "scatter"]

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def _slabs(layer: torch.Tensor, caches: PagedCaches, dtype: torch.dtype) -> torch.Tensor:
    """A (num_engine_blocks, num_kv, run) strided view of one layer, reinterpreted as ``dtype``."""
    view = layer.view(dtype)
    num_kv = 1 if caches.engine_layout == "cpu_packed" else 2
    run = caches.block_size * caches.num_kv_heads * caches.head_size * (2 if num_kv == 1 else 1)
    return torch.as_strided(
        view, (caches.num_engine_blocks, num_kv, run), (caches.block_stride, caches.kv_stride, 1)
    )


def _values(chunk: torch.Tensor, spec: ChunkSpec, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """One layer's value area as (num_kv, num_blocks, run) of ``dtype`` (a view of the chunk)."""
    start = spec.layer_offset(layer)
    width = torch.empty((), dtype=dtype).element_size()
    area = chunk[start : start + spec.num_runs * spec.run_elems * width]
    return area.view(dtype).view(spec.num_kv, spec.num_blocks, spec.run_elems)


def _scales(chunk: torch.Tensor, spec: ChunkSpec, layer: int) -> torch.Tensor:
    """One layer's scales as (num_kv, num_blocks, rows) float32 (a view of the chunk)."""
    start = spec.layer_offset(layer) + spec.scale_offset
    area = chunk[start : start + spec.scale_bytes]
    return area.view(torch.float32).view(spec.num_kv, spec.num_blocks, spec.rows_per_run)


def quantise_rows(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dimension of ``x`` row by row: (int8 or float8_e4m3fn values, float32 scales)."""
    qmax = QMAX[codec]
    x = x.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    y = x / scale.unsqueeze(-1)
    if codec == "int8":
        return torch.floor(y + 0.5).clamp_(-qmax, qmax).to(torch.int8), scale
    return y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn), scale


def dequantise_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantise_rows`, cast to ``dtype``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


# On CPU the slab moves go through numpy: single-threaded row copies at memcpy speed. torch's CPU
# index_copy_ runs at ~0.2 GiB/s here, and its index_select falls to ~0.1 GiB/s when its OpenMP threads
# compete with other processes for the cores (both measured on a loaded 2-core machine).
def _index_select(src: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out = src[ids]`` along dim 0, written into ``out``."""
    if src.device.type != "cpu":
        torch.index_select(src, 0, ids, out=out)
        return
    word = _INT_OF_WIDTH[src.element_size()]
    # mode="clip" avoids numpy's buffered bounds check (the ids were checked by the dispatcher).
    np.take(src.view(word).numpy(), ids.numpy(), axis=0, out=out.view(word).numpy(), mode="clip")


def _index_copy(dst: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[ids] = src`` along dim 0, written through the strided view into the cache."""
    if dst.device.type != "cpu":
        dst.index_copy_(0, ids, src)
        return
    word = _INT_OF_WIDTH[dst.element_size()]
    dst.view(word).numpy()[ids.numpy()] = src.view(word).numpy()


def _quant_dtype(codec: str) -> torch.dtype:
    return torch.float8_e4m3fn if codec == "fp8" else torch.int8


def gather(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor, first_layer: int
) -> None:
    """Write the chunk sections of ``caches`` (layers ``first_layer``...) for ``block_ids`` into ``chunk``."""
    ids = block_ids.to(caches.device)
    if not spec.quantised:
        word = _INT_OF_WIDTH[caches.itemsize]
        for i, layer in enumerate(caches.layers):
            slabs = _slabs(layer, caches, word)
            out = _values(chunk, spec, first_layer + i, word)
            for kv in range(spec.num_kv):
                _index_select(slabs[:, kv], ids, out[kv])
        return
    dtype = _TORCH_DTYPES[caches.dtype]
    for i, layer in enumerate(caches.layers):
        slabs = _slabs(layer, caches, dtype)
        rows = torch.stack([slabs[:, kv].index_select(0, ids) for kv in range(spec.num_kv)])
        q, scale = quantise_rows(rows.view(spec.num_kv, spec.num_blocks, spec.rows_per_run, -1), spec.codec)
        _values(chunk, spec, first_layer + i, _quant_dtype(spec.codec)).copy_(q.flatten(2))
        _scales(chunk, spec, first_layer + i).copy_(scale)


def scatter(
    caches: PagedCaches, block_ids: torch.Tensor, spec: ChunkSpec, chunk: torch.Tensor, first_layer: int
) -> None:
    """Write the chunk sections of layers ``first_layer``... into ``caches`` at ``block_ids``.

    Negative ids (``SKIP_BLOCK``) are blocks the engine already holds: their rows are left out.
    """
    ids = block_ids.to(caches.device)
    keep: torch.Tensor | None = None
    if bool((ids < 0).any()):
        keep = (ids >= 0).nonzero().view(-1)
        ids = ids.index_select(0, keep)
    if not spec.quantised:
        word = _INT_OF_WIDTH[caches.itemsize]
        for i, layer in enumerate(caches.layers):
            slabs = _slabs(layer, caches, word)
            src = _values(chunk, spec, first_layer + i, word)
            for kv in range(spec.num_kv):
                rows = src[kv] if keep is None else src[kv].index_select(0, keep)
                _index_copy(slabs[:, kv], ids, rows)
        return
    dtype = _TORCH_DTYPES[caches.dtype]
    for i, layer in enumerate(caches.layers):
        slabs = _slabs(layer, caches, dtype)
        q = _values(chunk, spec, first_layer + i, _quant_dtype(spec.codec))
        q = q.view(spec.num_kv, spec.num_blocks, spec.rows_per_run, spec.head_size)
        x = dequantise_rows(q, _scales(chunk, spec, first_layer + i), dtype).flatten(2)
        for kv in range(spec.num_kv):
            rows = x[kv] if keep is None else x[kv].index_select(0, keep)
            _index_copy(slabs[:, kv], ids, rows)
