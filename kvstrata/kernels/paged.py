"""Reading an engine's paged KV tensors: shapes, strides, and where each layer lives.

:func:`describe_caches` checks a list of per-layer paged tensors against one of the engine layouts of
:data:`kvstrata.core.layout.ENGINE_LAYOUTS` and returns a :class:`PagedCaches`: the geometry every
kernel (Triton or torch) needs. All layers must share shape, strides, dtype and device; they may be
separate allocations (a GPU engine) or views of one buffer (vLLM's CPU backend). A (block, K-or-V) slab
must be contiguous, which holds for every layout vLLM allocates; only the block and K/V strides are free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstrata.core.layout import ENGINE_LAYOUTS
from kvstrata.errors import InvalidArgumentError, LayoutError, UnsupportedLayoutError
from kvstrata.kernels.codec import KV_DTYPES, QUANTISABLE_DTYPES, ChunkSpec

__all__ = [
    "SKIP_BLOCK",
    "BlockIds",
    "PagedCaches",
    "as_block_ids",
    "as_layer_list",
    "describe_caches",
    "prepare_block_ids",
]

#: A block id that a scatter does not write: the engine already holds that block of the chunk.
SKIP_BLOCK = -1

# Per engine layout: (index of the block dim, index of the K/V dim or None, names of the 5 or 4 dims).
_DIMS: dict[str, tuple[int, int | None, tuple[str, ...]]] = {
    "kv_first_nhd": (1, 0, ("kv", "blocks", "block_size", "heads", "head_size")),
    "kv_first_hnd": (1, 0, ("kv", "blocks", "heads", "block_size", "head_size")),
    "kv_second_nhd": (0, 1, ("blocks", "kv", "block_size", "heads", "head_size")),
    "kv_second_hnd": (0, 1, ("blocks", "kv", "heads", "block_size", "head_size")),
    "cpu_packed": (0, None, ("blocks", "heads", "block_size", "head_size_x2")),
}
assert set(_DIMS) == set(ENGINE_LAYOUTS)


@dataclass(frozen=True)
class PagedCaches:
    """Per-layer paged KV tensors of one engine, checked against an engine layout.

    ``block_stride`` and ``kv_stride`` are in cache elements (``kv_stride`` is 0 for ``cpu_packed``);
    ``layer_offsets[l]`` is ``(address of layer l - address of layer 0) / itemsize``.
    """

    layers: tuple[torch.Tensor, ...]
    engine_layout: str
    dtype: str
    itemsize: int
    num_engine_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    block_stride: int
    kv_stride: int
    layer_offsets: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        """The device every layer lives on."""
        return self.layers[0].device

    def spec(self, num_blocks: int, codec: str, num_layers: int | None = None) -> ChunkSpec:
        """The chunk geometry for ``num_blocks`` blocks of these caches (``num_layers`` defaults to all)."""
        spec = ChunkSpec(
            codec=codec,
            dtype=self.dtype,
            itemsize=self.itemsize,
            engine_layout=self.engine_layout,
            num_layers=len(self.layers) if num_layers is None else num_layers,
            num_blocks=num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
        )
        if spec.quantised:
            if spec.packed:
                raise UnsupportedLayoutError(
                    f"codec {codec!r} cannot apply to the cpu_packed layout: its blocks pack K and V in a "
                    "dtype-dependent order, so (token, head) vectors are not addressable; use codec "
                    "'none'"
                )
            if self.dtype not in QUANTISABLE_DTYPES:
                raise UnsupportedLayoutError(
                    f"codec {codec!r} needs a float16/bfloat16/float32 cache, not {self.dtype} "
                    "(a one-byte cache is already as small as the codec would make it)"
                )
        return spec


def as_layer_list(caches: torch.Tensor | Sequence[torch.Tensor], engine_layout: str) -> list[torch.Tensor]:
    """Per-layer tensors from a list, or from one stacked tensor with a leading layer dimension."""
    if engine_layout not in _DIMS:
        raise LayoutError(f"unknown engine layout {engine_layout!r}; known: {ENGINE_LAYOUTS}")
    ndim = len(_DIMS[engine_layout][2])
    if isinstance(caches, torch.Tensor):
        if caches.dim() == ndim + 1:
            return list(caches.unbind(0))
        if caches.dim() == ndim:
            return [caches]
        raise LayoutError(f"{engine_layout} cache must have {ndim} dims (or {ndim + 1} stacked)")
    layers = list(caches)
    if not layers:
        raise InvalidArgumentError("no cache layers given")
    return layers


def describe_caches(caches: torch.Tensor | Sequence[torch.Tensor], engine_layout: str) -> PagedCaches:
    """Check per-layer paged tensors against ``engine_layout``; :class:`LayoutError` when they do not fit."""
    layers = as_layer_list(caches, engine_layout)
    block_dim, kv_dim, documented = _DIMS[engine_layout]
    names = list(documented)
    first = layers[0]
    for i, layer in enumerate(layers):
        if not isinstance(layer, torch.Tensor):
            raise InvalidArgumentError(f"layer {i} is not a tensor")
        if (
            layer.shape != first.shape
            or layer.stride() != first.stride()
            or layer.dtype != first.dtype
            or layer.device != first.device
        ):
            raise LayoutError(f"layer {i} differs from layer 0 in shape, strides, dtype or device")
    if first.dim() != len(names):
        raise LayoutError(f"{engine_layout} cache must be {names}, got shape {tuple(first.shape)}")
    dtype = str(first.dtype).removeprefix("torch.")
    if dtype not in KV_DTYPES:
        raise UnsupportedLayoutError(f"cache dtype {dtype} is not supported; supported: {KV_DTYPES}")
    inner = [d for d in range(first.dim()) if d not in (block_dim, kv_dim)]
    if engine_layout != "cpu_packed":
        # vLLM hands an HND cache over as a permuted view: logical (..., block_size, heads, head_size) with
        # HND strides. The layout name says the physical order; a view whose two outer slab dims are
        # swapped in memory is read with their names swapped, so both forms of the same buffer work.
        outer, middle = inner[0], inner[1]
        if first.shape[outer] > 1 and first.shape[middle] > 1 and first.stride(outer) < first.stride(middle):
            names[outer], names[middle] = names[middle], names[outer]
            inner = [middle, outer, inner[2]]
    shape = dict(zip(names, first.shape, strict=True))
    if kv_dim is not None and shape["kv"] != 2:
        raise LayoutError(f"{engine_layout}: the K/V dimension must be 2, got {shape['kv']}")
    if engine_layout == "cpu_packed":
        if shape["head_size_x2"] % 2:
            raise LayoutError(f"cpu_packed: last dim must be 2 * head_size, got {shape['head_size_x2']}")
        head_size = shape["head_size_x2"] // 2
    else:
        head_size = shape["head_size"]
    # The slab of one (block, K-or-V) must be contiguous, in the physical order of ``inner``.
    expected = 1
    for d in reversed(inner):
        if first.shape[d] != 1 and first.stride(d) != expected:
            raise UnsupportedLayoutError(
                f"{engine_layout}: a block's slab must be contiguous (strides {first.stride()}); "
                "only the block and K/V dimensions may be strided"
            )
        expected *= first.shape[d]
    itemsize = first.element_size()
    base = first.data_ptr()
    offsets = []
    for layer in layers:
        delta = layer.data_ptr() - base
        if delta % itemsize:
            raise UnsupportedLayoutError("layer base addresses are not a whole number of elements apart")
        offsets.append(delta // itemsize)
    return PagedCaches(
        layers=tuple(layers),
        engine_layout=engine_layout,
        dtype=dtype,
        itemsize=itemsize,
        num_engine_blocks=int(first.shape[block_dim]),
        block_size=int(shape["block_size"]),
        num_kv_heads=int(shape["heads"]),
        head_size=int(head_size),
        block_stride=int(first.stride(block_dim)),
        kv_stride=0 if kv_dim is None else int(first.stride(kv_dim)),
        layer_offsets=tuple(offsets),
    )


@dataclass(frozen=True)
class BlockIds:
    """Block ids checked once and placed on a device, for reuse across calls (one per layer, say).

    Made by :func:`prepare_block_ids`; the gather/scatter entry points accept it in place of a list and
    then only compare ``max_id`` with the cache's block count (no synchronisation, no upload).
    ``has_skips``: some ids are :data:`SKIP_BLOCK` (only a scatter accepts those).
    """

    tensor: torch.Tensor
    max_id: int
    has_skips: bool = False

    def __len__(self) -> int:
        return int(self.tensor.numel())


def _checked_ids(block_ids: Sequence[int] | torch.Tensor, allow_skip: bool) -> tuple[torch.Tensor, int, bool]:
    ids = torch.as_tensor(block_ids, dtype=torch.int64)
    if ids.dim() != 1 or ids.numel() == 0:
        raise InvalidArgumentError(
            f"block ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}"
        )
    lo, hi = int(ids.min()), int(ids.max())
    skips = lo == SKIP_BLOCK
    if lo < 0 and not (allow_skip and skips):
        raise InvalidArgumentError(
            f"block ids must not be negative, got {lo}"
            + (f" (only {SKIP_BLOCK}, 'skip this block', is allowed in a scatter)" if allow_skip else "")
        )
    return ids, hi, skips


def prepare_block_ids(
    block_ids: Sequence[int] | torch.Tensor, device: torch.device | str, *, allow_skip: bool = False
) -> BlockIds:
    """Check ``block_ids`` once and upload them to ``device`` for reuse (see :class:`BlockIds`)."""
    ids, hi, skips = _checked_ids(block_ids, allow_skip)
    return BlockIds(ids.to(device), hi, skips)


def as_block_ids(
    block_ids: Sequence[int] | torch.Tensor | BlockIds, num_engine_blocks: int, *, allow_skip: bool = False
) -> torch.Tensor:
    """Block ids as a 1-D int64 tensor, bounds-checked (an id out of range would address foreign memory).

    ``allow_skip`` (scatters only) admits :data:`SKIP_BLOCK` entries: chunk blocks that are not written
    because the engine already holds them (a local prefix hit that ends inside a chunk).
    A device tensor is checked too, which costs one synchronisation; pass a list, a CPU tensor, or a
    :class:`BlockIds` on hot paths (the connector has the ids on the host anyway).
    """
    if isinstance(block_ids, BlockIds):
        ids, hi, skips = block_ids.tensor, block_ids.max_id, block_ids.has_skips
        if skips and not allow_skip:
            raise InvalidArgumentError(f"block id {SKIP_BLOCK} ('skip') is allowed in a scatter only")
    else:
        ids, hi, skips = _checked_ids(block_ids, allow_skip)
    if hi >= num_engine_blocks:
        raise InvalidArgumentError(f"block ids must lie in 0..{num_engine_blocks - 1}, got {hi}")
    if skips and hi < 0:
        raise InvalidArgumentError("a scatter must write at least one block")
    return ids
