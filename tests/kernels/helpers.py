"""Paged caches of every engine layout, filled with KV-like data, for the kernel tests."""

from __future__ import annotations

import torch

SPLIT_LAYOUTS = ("kv_first_nhd", "kv_first_hnd", "kv_second_nhd", "kv_second_hnd")
ALL_LAYOUTS = (*SPLIT_LAYOUTS, "cpu_packed")


def layer_shape(layout: str, num_blocks: int, block_size: int, heads: int, head_size: int) -> tuple[int, ...]:
    """The per-layer tensor shape of ``layout`` (as in kvstrata.core.layout.ENGINE_LAYOUTS)."""
    return {
        "kv_first_nhd": (2, num_blocks, block_size, heads, head_size),
        "kv_first_hnd": (2, num_blocks, heads, block_size, head_size),
        "kv_second_nhd": (num_blocks, 2, block_size, heads, head_size),
        "kv_second_hnd": (num_blocks, 2, heads, block_size, head_size),
        "cpu_packed": (num_blocks, heads, block_size, 2 * head_size),
    }[layout]


def fill(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random KV-like values (every bit pattern distinct enough that a misplaced byte shows)."""
    if dtype in (torch.uint8, torch.int8):
        return torch.randint(-100 if dtype == torch.int8 else 0, 100, shape, dtype=dtype, generator=generator)
    values = torch.randn(shape, generator=generator) * 3
    return values.to(dtype)


def make_caches(
    layout: str,
    *,
    num_layers: int = 2,
    num_blocks: int = 5,
    block_size: int = 16,
    heads: int = 2,
    head_size: int = 16,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    one_buffer: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-layer caches: separate allocations, or (``one_buffer``) views of one buffer (vLLM CPU build)."""
    gen = torch.Generator().manual_seed(seed)
    shape = layer_shape(layout, num_blocks, block_size, heads, head_size)
    if one_buffer:
        whole = fill((num_layers, *shape), dtype, gen).to(device)
        return list(whole.unbind(0))
    return [fill(shape, dtype, gen).to(device) for _ in range(num_layers)]


def realistic_kv(num_rows: int, head_size: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of (token, head) vectors like real K: normal activations plus a few outlier channels."""
    x = torch.randn(num_rows, head_size, generator=generator)
    outliers = torch.randperm(head_size, generator=generator)[: max(1, head_size // 16)]
    x[:, outliers] *= 12.0
    return x


def block_of(cache: torch.Tensor, layout: str, block: int) -> torch.Tensor:
    """One block of one layer (K and V), as a tensor comparable across caches of the same layout."""
    if layout.startswith("kv_first"):
        return cache[:, block]
    return cache[block]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparison (NaN payloads and fp8 included)."""
    return t.contiguous().view(torch.uint8).reshape(-1)
