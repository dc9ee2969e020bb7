"""Benchmarks of the paging kernels: gather/scatter bandwidth against ``copy_`` of the same bytes.

Run: ``python bench/kernels.py [--blocks N] [--device cpu|cuda]`` (one JSON object per line on stdout).

- On a GPU: 256 blocks of a 7B-like layout (32 layers, 8 KV heads, head 128, bf16, block 16) gathered
  into and scattered from one chunk by the Triton kernels (codec none and fp8), against a device-to-device
  ``copy_`` of the same bytes (the ceiling), and against the torch reference (per-layer
  ``index_select`` / ``index_copy_``) on the same device.
- On CPU: the torch reference path (what a CPU engine runs) against ``copy_`` of the same bytes.
- Everywhere: the quantisation error of fp8 and int8 on realistic KV (normal activations with a few
  outlier channels, like K; plain normal, like V).

Bandwidth counts the uncompressed KV bytes of the chunk, so a quantising kernel that writes fewer bytes
can exceed the ratio of a plain copy. Every line carries the device name.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import best_time, emit, gib_per_s, log
from kvstrata.kernels import chunk_spec, gather, read_header, scatter
from kvstrata.kernels.reference import dequantise_rows, quantise_rows

BENCH = "kernels"
LAYERS, HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16


def device_name(device: torch.device) -> str:
    """A human name for the device, put in every JSON line."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall time of ``fn`` in seconds, waiting for the device after each call."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return best_time(call, repeat=repeat, warmup=2)


def layer_shape(layout: str, num_blocks: int) -> tuple[int, ...]:
    """The per-layer cache shape of the 7B-like model in ``layout``."""
    if layout == "cpu_packed":
        return (num_blocks, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    if layout == "kv_first_nhd":
        return (2, num_blocks, BLOCK_SIZE, HEADS, HEAD_SIZE)
    return (num_blocks, 2, HEADS, BLOCK_SIZE, HEAD_SIZE)  # kv_second_hnd


def bench_paging(
    device: torch.device, layout: str, blocks: int, codec: str, repeat: int, backends: list[str]
) -> None:
    """Gather and scatter of ``blocks`` random blocks, against copy_ of the same bytes."""
    name = device_name(device)
    engine_blocks = blocks * 2
    shape = layer_shape(layout, engine_blocks)
    if layout == "cpu_packed":  # vLLM's CPU build: every layer a view of one buffer
        caches = list(torch.randn((LAYERS, *shape), device=device).to(torch.bfloat16).unbind(0))
    else:
        caches = [torch.randn(shape, device=device).to(torch.bfloat16) for _ in range(LAYERS)]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(engine_blocks, generator=gen)[:blocks]
    targets = torch.randperm(engine_blocks, generator=gen)[:blocks]
    spec = chunk_spec(caches, layout, blocks, codec)
    kv_bytes = chunk_spec(caches, layout, blocks).payload_bytes
    out = torch.empty(spec.total_bytes, dtype=torch.uint8, device=device)
    src = torch.empty(kv_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ceiling = gib_per_s(kv_bytes, timed(lambda: dst.copy_(src), device, repeat))
    chunk = gather(caches, ids, engine_layout=layout, codec=codec, out=out, backend="torch")
    header = read_header(chunk)  # what a connector does: decode the header once, from the host copy
    results: dict[tuple[str, str], float] = {}
    for backend in backends:
        for op in ("gather", "scatter"):

            def run(op: str = op, backend: str = backend) -> object:
                if op == "gather":
                    return gather(caches, ids, engine_layout=layout, codec=codec, out=out, backend=backend)
                return scatter(chunk, caches, targets, engine_layout=layout, header=header, backend=backend)

            value = gib_per_s(kv_bytes, timed(run, device, repeat))
            results[(backend, op)] = value
            extra: dict[str, object] = {
                "device": name,
                "layout": layout,
                "codec": codec,
                "blocks": blocks,
                "bytes": kv_bytes,
            }
            emit(BENCH, f"{op}_{backend}_{layout}_{codec}", value, "GiB/s", ceiling, **extra)
    if "triton" in backends and "torch" in backends:
        for op in ("gather", "scatter"):
            speedup = results[("triton", op)] / results[("torch", op)]
            emit(
                BENCH,
                f"{op}_triton_vs_torch_{layout}_{codec}",
                speedup,
                "x",
                None,
                device=name,
                blocks=blocks,
            )


def bench_quant_error(device: torch.device) -> None:
    """Relative and max-abs error of fp8/int8 on realistic K (outlier channels) and V (plain normal)."""
    name = device_name(device)
    gen = torch.Generator().manual_seed(1)
    rows = 16 * 1024
    k = torch.randn(rows, HEAD_SIZE, generator=gen)
    outliers = torch.randperm(HEAD_SIZE, generator=gen)[: HEAD_SIZE // 16]
    k[:, outliers] *= 12.0
    v = torch.randn(rows, HEAD_SIZE, generator=gen)
    for kind, x in (("k_outliers", k), ("v_normal", v)):
        x = x.to(torch.bfloat16).float()
        for codec in ("fp8", "int8"):
            q, scale = quantise_rows(x, codec)
            y = dequantise_rows(q, scale, torch.bfloat16).float()
            err = (y - x).abs()
            rel = float(err.norm() / x.norm())
            max_rel_to_row = float((err / x.abs().amax(dim=1, keepdim=True)).max())
            emit(BENCH, f"quant_error_{codec}_{kind}_rel_l2", rel, "ratio", None, device=name)
            emit(BENCH, f"quant_error_{codec}_{kind}_max_abs", float(err.max()), "abs", None, device=name)
            emit(
                BENCH,
                f"quant_error_{codec}_{kind}_max_abs_over_row_amax",
                max_rel_to_row,
                "ratio",
                None,
                device=name,
            )


def main() -> None:
    """Parse arguments and run every benchmark that the device allows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=0, help="blocks per chunk (default 256 GPU, 32 CPU)")
    parser.add_argument("--repeat", type=int, default=0)
    parser.add_argument(
        "--backends", default="", help="comma-separated: triton,torch (default both on CUDA, torch on CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    blocks = args.blocks or (256 if on_gpu else 32)
    repeat = args.repeat or (20 if on_gpu else 3)
    backends = args.backends.split(",") if args.backends else (["triton", "torch"] if on_gpu else ["torch"])
    log(f"# kernels on {device_name(device)}: {blocks} blocks of a 7B-like layout")
    layouts = ["kv_first_nhd", "kv_second_hnd"] if on_gpu else ["cpu_packed", "kv_first_nhd"]
    for layout in layouts:
        bench_paging(device, layout, blocks, "none", repeat, backends)
    bench_paging(device, "kv_first_nhd", blocks, "fp8", repeat, backends)
    if on_gpu:
        bench_paging(device, "kv_first_nhd", blocks, "int8", repeat, backends)
    bench_quant_error(device)


if __name__ == "__main__":
    main()
