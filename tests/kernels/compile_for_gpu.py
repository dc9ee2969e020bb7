"""Compile the Triton kernels for a Hopper GPU without one, and report what the PTX contains (JSON).

Run as ``python -m tests.kernels.compile_for_gpu`` with ``TRITON_INTERPRET`` unset: the interpreter
replaces compilation, so this must be its own process. Triton's wheel ships ptxas, so no CUDA install or
GPU is needed. test_compile.py checks the report: the kernels compile, the copies are vectorised
(16-byte loads and stores), division is IEEE (``div.rn``) and the e4m3 cast rounds to nearest.
"""

from __future__ import annotations

import json
import re
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvstrata.kernels import triton_paged, triton_quant

_ALIGNED = [["tt.divisibility", 16]]
_TARGET = GPUTarget("cuda", 90, 32)


def _ptx(fn: Any, types: dict[str, str], constants: dict[str, Any], aligned: list[str]) -> str:
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): _ALIGNED for name in aligned}
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    return str(triton.compile(source, target=_TARGET, options={"num_warps": 4}).asm["ptx"])


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def main() -> None:
    """Compile a representative set of kernels and print one JSON object per kernel."""
    ints = (
        "num_blocks",
        "block_stride",
        "kv_stride",
        "run",
        "layer_stride",
        "first_layer",
        "rows",
        "scale_offset",
    )
    common = {name: "i32" for name in ints} | {"layer_offs": "*i64", "ids": "*i64"}
    aligned = [
        "cache",
        "layer_offs",
        "ids",
        "chunk",
        "qchunk",
        "schunk",
        "block_stride",
        "kv_stride",
        "run",
        "rows",
        "layer_stride",
        "scale_offset",
    ]
    paged = common | {"cache": "*i32", "chunk": "*i32"}
    for fn in (triton_paged._gather_kernel, triton_paged._scatter_kernel):
        names = set(fn.arg_names)
        ptx = _ptx(fn, paged, {"NUM_KV": 2, "UNIT": 16, "TILE": 2048}, [a for a in aligned if a in names])
        print(
            json.dumps(
                {
                    "kernel": fn.__name__,
                    "ld_v4": _count(r"ld\.global(\.\w+)*\.v4", ptx),
                    "st_v4": _count(r"st\.global(\.\w+)*\.v4", ptx),
                }
            )
        )
    for dtype, codec in (("bf16", "fp8"), ("fp16", "int8")):
        qtype = "fp8e4nv" if codec == "fp8" else "i8"
        types = common | {"cache": f"*{dtype}", "qchunk": f"*{qtype}", "schunk": "*fp32"}
        shape = {"HEAD": 128, "HEAD_P2": 128, "ROWS": 32, "UNIT": 16}
        for fn, extra in (
            (
                triton_quant._gather_quant_kernel,
                {"QMAX": 448.0 if codec == "fp8" else 127.0, "IS_FP8": codec == "fp8"},
            ),
            (triton_quant._scatter_dequant_kernel, {}),
        ):
            names = set(fn.arg_names)
            ptx = _ptx(fn, types, shape | extra, [a for a in aligned if a in names])
            print(
                json.dumps(
                    {
                        "kernel": fn.__name__,
                        "dtype": dtype,
                        "codec": codec,
                        "ld_v4": _count(r"ld\.global(\.\w+)*\.v4", ptx),
                        "st_v4": _count(r"st\.global(\.\w+)*\.v4", ptx),
                        "div_rn": _count(r"div\.rn\.f32", ptx),
                        "div_approx": _count(r"div\.(full|approx)\.f32", ptx),
                        "cvt_e4m3_rn": _count(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx),
                    }
                )
            )


if __name__ == "__main__":
    main()
