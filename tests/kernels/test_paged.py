"""Paged gather/scatter (codec none): Triton against the torch reference for every layout and dtype."""

from __future__ import annotations

import pytest
import torch

from kvstrata.errors import ChunkFormatError, InvalidArgumentError, LayoutError, UnsupportedLayoutError
from kvstrata.kernels import (
    HEADER_BYTES,
    chunk_spec,
    gather,
    gather_layer,
    prepare_block_ids,
    read_header,
    scatter,
    scatter_layer,
)
from kvstrata.kernels.paged import SKIP_BLOCK
from tests.kernels.helpers import ALL_LAYOUTS, bits, block_of, make_caches

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)


def _slab(cache: torch.Tensor, layout: str, block: int, kv: int) -> torch.Tensor:
    """The (block, K-or-V) slab the chunk format says is copied verbatim (the whole block for cpu_packed)."""
    whole = block_of(cache, layout, block)
    return whole if layout == "cpu_packed" else whole[kv]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_gather_and_scatter_match_reference(layout: str, dtype: torch.dtype, device: torch.device) -> None:
    packed = layout == "cpu_packed"
    caches = make_caches(layout, dtype=dtype, device=device, one_buffer=packed, seed=1)
    ids = [3, 0, 4]
    chunk = gather(caches, ids, engine_layout=layout, backend="triton")
    expected = gather(caches, ids, engine_layout=layout, backend="torch")
    assert torch.equal(chunk.cpu(), expected.cpu())

    # The reference itself follows the documented format: [layer][kv][block] slabs after the header.
    spec = chunk_spec(caches, layout, len(ids))
    assert chunk.numel() == spec.total_bytes
    slab_bytes = spec.run_elems * spec.itemsize
    for layer, cache in enumerate(caches):
        for kv in range(spec.num_kv):
            for j, block in enumerate(ids):
                start = spec.layer_offset(layer) + (kv * len(ids) + j) * slab_bytes
                assert torch.equal(
                    expected[start : start + slab_bytes], bits(_slab(cache, layout, block, kv))
                )

    # Scatter into other block ids of fresh caches: the blocks come back bit for bit, the rest is untouched.
    targets = [1, 2, 0]
    dst = [torch.zeros_like(c) for c in caches]
    ref = [torch.zeros_like(c) for c in caches]
    header = scatter(chunk, dst, targets, engine_layout=layout, backend="triton")
    scatter(expected, ref, targets, engine_layout=layout, backend="torch")
    assert header.codec == "none"
    for src, out, oracle in zip(caches, dst, ref, strict=True):
        assert torch.equal(bits(out), bits(oracle))
        for block, target in zip(ids, targets, strict=True):
            assert torch.equal(bits(block_of(out, layout, target)), bits(block_of(src, layout, block)))
        assert not bits(block_of(out, layout, 3)).any()


@pytest.mark.parametrize(
    ("layout", "block_size", "heads", "head_size"),
    [("kv_first_hnd", 128, 1, 16), ("kv_second_nhd", 32, 2, 64), ("cpu_packed", 128, 1, 32)],
)
def test_block_sizes_and_shared_buffers(
    layout: str, block_size: int, heads: int, head_size: int, device: torch.device
) -> None:
    # Layers as views of one buffer (vLLM's CPU build), sliced so that layer 0 does not start the storage.
    whole = make_caches(
        layout,
        num_layers=3,
        num_blocks=4,
        block_size=block_size,
        heads=heads,
        head_size=head_size,
        dtype=torch.bfloat16,
        device=device,
        one_buffer=True,
        seed=2,
    )
    caches = whole[1:]
    chunk = gather(caches, [2, 3], engine_layout=layout, backend="triton")
    assert torch.equal(chunk.cpu(), gather(caches, [2, 3], engine_layout=layout, backend="torch").cpu())
    dst = [c.clone() for c in caches]
    scatter(chunk, dst, [0, 1], engine_layout=layout, backend="triton")
    for src, out in zip(caches, dst, strict=True):
        assert torch.equal(bits(block_of(out, layout, 0)), bits(block_of(src, layout, 2)))
        assert torch.equal(bits(block_of(out, layout, 1)), bits(block_of(src, layout, 3)))
        assert torch.equal(bits(block_of(out, layout, 2)), bits(block_of(src, layout, 2)))
    # Layer 0 of the buffer, outside the list, is untouched.
    assert torch.equal(
        bits(whole[0]),
        bits(
            make_caches(
                layout,
                num_layers=3,
                num_blocks=4,
                block_size=block_size,
                heads=heads,
                head_size=head_size,
                dtype=torch.bfloat16,
                device=device,
                one_buffer=True,
                seed=2,
            )[0]
        ),
    )


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("layout", ["kv_first_hnd", "kv_second_hnd"])
def test_vllm_permuted_hnd_view_reads_as_its_buffer(layout: str, codec: str, device: torch.device) -> None:
    # vLLM allocates an HND cache physically and hands over a view with logical NHD dims (stride order).
    physical = make_caches(layout, heads=2, block_size=16, dtype=torch.bfloat16, device=device, seed=6)
    views = [c.transpose(-3, -2) for c in physical]
    assert views[0].shape[-3:] == (16, 2, 16) and not views[0].is_contiguous()
    chunk = gather(views, [1, 3], engine_layout=layout, codec=codec, backend="triton")
    assert torch.equal(chunk.cpu(), gather(physical, [1, 3], engine_layout=layout, codec=codec).cpu())
    dst = [torch.zeros_like(c) for c in physical]
    scatter(chunk, [d.transpose(-3, -2) for d in dst], [0, 2], engine_layout=layout, backend="triton")
    ref = [torch.zeros_like(c) for c in physical]
    scatter(chunk, ref, [0, 2], engine_layout=layout, backend="torch")
    for got, want in zip(dst, ref, strict=True):
        assert (
            torch.equal(bits(got), bits(want)) if codec == "none" else torch.allclose(got, want, rtol=2**-7)
        )
        assert got.abs().sum() > 0


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_layer_wise_equals_whole_chunk(codec: str, device: torch.device) -> None:
    layout = "kv_second_hnd"
    caches = make_caches(layout, num_layers=3, dtype=torch.float16, device=device, seed=3)
    ids = [4, 2]
    whole = gather(caches, ids, engine_layout=layout, codec=codec, backend="triton")
    out = torch.zeros_like(whole)
    for layer, cache in enumerate(caches):
        gather_layer(
            cache,
            ids,
            layer=layer,
            num_layers=3,
            engine_layout=layout,
            codec=codec,
            out=out,
            backend="triton",
        )
    assert torch.equal(out, whole)

    one_by_one = [torch.zeros_like(c) for c in caches]
    at_once = [torch.zeros_like(c) for c in caches]
    header = read_header(whole)
    targets = prepare_block_ids([0, 1], device)  # checked and uploaded once for every layer
    for layer, cache in enumerate(one_by_one):
        scatter_layer(
            whole, cache, targets, layer=layer, engine_layout=layout, header=header, backend="triton"
        )
    scatter(whole, at_once, [0, 1], engine_layout=layout, backend="triton")
    for a, b in zip(one_by_one, at_once, strict=True):
        assert torch.equal(a, b)
        assert a.abs().sum() > 0


def test_stacked_tensor_and_preallocated_slot() -> None:
    layout = "kv_first_nhd"
    caches = make_caches(layout, num_layers=2, dtype=torch.float32, one_buffer=True, seed=4)
    stacked = torch.stack(caches)
    spec = chunk_spec(stacked, layout, 2)
    slot = torch.full((spec.total_bytes + 100,), 7, dtype=torch.uint8)
    chunk = gather(stacked, [1, 0], engine_layout=layout, out=slot, backend="torch")
    assert chunk.data_ptr() == slot.data_ptr() and chunk.numel() == spec.total_bytes
    assert torch.equal(chunk, gather(caches, [1, 0], engine_layout=layout, backend="torch"))
    assert bool((slot[spec.total_bytes :] == 7).all())


def test_bad_arguments_raise_typed_errors() -> None:
    layout = "kv_first_nhd"
    caches = make_caches(layout, dtype=torch.float16)
    with pytest.raises(InvalidArgumentError):
        gather(caches, [5], engine_layout=layout)  # num_blocks is 5: ids 0..4
    with pytest.raises(InvalidArgumentError):
        gather(caches, [], engine_layout=layout)
    with pytest.raises(InvalidArgumentError):
        gather(caches, [-1], engine_layout=layout)
    with pytest.raises(InvalidArgumentError):
        gather(caches, prepare_block_ids([0, 5], "cpu"), engine_layout=layout)
    with pytest.raises(InvalidArgumentError):
        prepare_block_ids(torch.zeros(2, 2, dtype=torch.int64), "cpu")
    with pytest.raises(LayoutError):
        gather(caches, [0], engine_layout="kv_second_nhd")  # K/V dim is not 2
    with pytest.raises(LayoutError):
        gather(caches, [0], engine_layout="no_such_layout")
    with pytest.raises(LayoutError):
        gather([caches[0], caches[1][:, :4]], [0], engine_layout=layout)  # layers differ
    with pytest.raises(UnsupportedLayoutError):
        gather([c.transpose(3, 4) for c in caches], [0], engine_layout=layout)  # slab not contiguous
    with pytest.raises(InvalidArgumentError):
        gather(caches, [0], engine_layout=layout, out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError):
        gather(caches, [0], engine_layout=layout, codec="zstd")
    with pytest.raises(InvalidArgumentError):
        gather(caches, [0], engine_layout=layout, backend="cuda-magic")


def test_scatter_refuses_a_foreign_or_corrupt_chunk_before_writing() -> None:
    layout = "kv_first_nhd"
    caches = make_caches(layout, dtype=torch.float16, seed=5)
    chunk = gather(caches, [0, 1], engine_layout=layout, backend="torch")
    dst = [torch.zeros_like(c) for c in caches]
    with pytest.raises(LayoutError, match="num_blocks"):
        scatter(chunk, dst, [0, 1, 2], engine_layout=layout)
    other = make_caches(layout, dtype=torch.float16, head_size=32)
    with pytest.raises(LayoutError, match="head_size"):
        scatter(chunk, [torch.zeros_like(c) for c in other], [0, 1], engine_layout=layout)
    with pytest.raises(LayoutError, match="dtype"):
        scatter(
            chunk, [torch.zeros_like(c, dtype=torch.bfloat16) for c in caches], [0, 1], engine_layout=layout
        )
    corrupt = chunk.clone()
    corrupt[20] ^= 1
    with pytest.raises(ChunkFormatError):
        scatter(corrupt, dst, [0, 1], engine_layout=layout)
    with pytest.raises(ChunkFormatError):
        scatter(chunk[: HEADER_BYTES - 1], dst, [0, 1], engine_layout=layout)
    truncated = chunk[:-1]
    with pytest.raises(InvalidArgumentError):
        scatter(truncated, dst, [0, 1], engine_layout=layout)
    assert not any(bits(d).any() for d in dst)


def test_forcing_triton_without_a_device_or_interpreter_fails_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvstrata.errors import KernelError
    from kvstrata.kernels import select_backend

    assert select_backend(torch.device("cpu"), "auto") == "torch"
    assert select_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="CUDA"):
        select_backend(torch.device("cpu"), "triton")


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("layout", ["kv_first_nhd", "cpu_packed"])
def test_scatter_skips_the_blocks_the_engine_holds(layout: str, codec: str, device: torch.device) -> None:
    if layout == "cpu_packed" and codec != "none":
        pytest.skip("cpu_packed blocks are opaque: no quantised codec")
    caches = make_caches(
        layout, dtype=torch.float16, device=device, one_buffer=layout == "cpu_packed", seed=5
    )
    chunk = gather(caches, [3, 0, 4], engine_layout=layout, codec=codec, backend="torch")
    for backend in ("torch", "triton"):
        dst = [torch.full_like(c, 7) for c in caches]
        whole = [torch.full_like(c, 7) for c in caches]
        scatter(chunk, dst, [SKIP_BLOCK, 2, 1], engine_layout=layout, backend=backend)
        scatter(chunk, whole, [0, 2, 1], engine_layout=layout, backend="torch")
        for out, full, fresh in zip(dst, whole, caches, strict=True):
            # the skipped block keeps its old bytes (so does every other); the rest equals a full scatter
            assert torch.equal(bits(block_of(out, layout, 2)), bits(block_of(full, layout, 2)))
            assert torch.equal(bits(block_of(out, layout, 1)), bits(block_of(full, layout, 1)))
            for untouched in (0, 3, 4):
                assert torch.equal(
                    bits(block_of(out, layout, untouched)),
                    bits(torch.full_like(block_of(fresh, layout, 0), 7)),
                )
    with pytest.raises(InvalidArgumentError, match="negative"):
        gather(caches, [SKIP_BLOCK, 1, 2], engine_layout=layout)
    with pytest.raises(InvalidArgumentError, match="at least one"):
        scatter(chunk, caches, [SKIP_BLOCK] * 3, engine_layout=layout, backend="torch")
    with pytest.raises(InvalidArgumentError):
        scatter(chunk, caches, [-2, 1, 2], engine_layout=layout, backend="torch")
