"""One entry point per operation: Triton on CUDA, the torch reference elsewhere.

- :func:`gather` writes one self-describing chunk (header + every layer's section) for a list of engine
  blocks; :func:`scatter` reads the header, checks it against the cache, and writes the blocks back (into
  possibly different block ids), decoding whatever codec the header names.
- :func:`gather_layer` / :func:`scatter_layer` do the same for one layer's section, for pipelining one
  layer at a time; ``gather_layer(layer=0)`` writes the header.

Backends: ``"auto"`` uses Triton for CUDA tensors (when triton is installed) and the torch reference for
everything else; ``"triton"`` forces the kernels (on CPU only under ``TRITON_INTERPRET=1``, set before
the first call); ``"torch"`` forces the reference. The default comes from :func:`configure` (the
``[kernels] backend`` setting) and each call may override it. Triton is imported on first use only.

Failure semantics: a cache that does not match its engine layout raises :class:`LayoutError` (or
:class:`UnsupportedLayoutError` for a valid layout an operation cannot handle, such as a quantised codec on
``cpu_packed``); a chunk whose header is corrupt raises :class:`ChunkFormatError`; a chunk made for another
geometry raises :class:`LayoutError`. Callers that load KV treat every one of these as a miss (recompute),
never as data. Nothing is written to the cache before the header has been checked.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import torch

from kvstrata.errors import InvalidArgumentError, KernelError, KVStrataError
from kvstrata.kernels import reference
from kvstrata.kernels.codec import HEADER_BYTES, ChunkHeader, ChunkSpec
from kvstrata.kernels.paged import BlockIds, PagedCaches, as_block_ids, describe_caches

if TYPE_CHECKING:
    from kvstrata.config import KernelConfig

__all__ = [
    "Backend",
    "chunk_spec",
    "configure",
    "gather",
    "gather_layer",
    "read_header",
    "scatter",
    "scatter_layer",
    "select_backend",
]

log = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")
_default_backend: str = "auto"
_triton_modules: dict[str, ModuleType] = {}
_warned_no_triton = False

Caches = torch.Tensor | Sequence[torch.Tensor]
BlockIdsLike = Sequence[int] | torch.Tensor | BlockIds


def configure(config: KernelConfig) -> None:
    """Set the default backend from the ``[kernels]`` config section."""
    global _default_backend
    if config.backend not in _BACKENDS:
        raise InvalidArgumentError(f"unknown kernels backend {config.backend!r}; known: {_BACKENDS}")
    _default_backend = config.backend


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend that will run on ``device``: ``"triton"`` or ``"torch"``."""
    global _warned_no_triton
    choice = _default_backend if backend is None else backend
    if choice not in _BACKENDS:
        raise InvalidArgumentError(f"unknown kernels backend {choice!r}; known: {_BACKENDS}")
    if choice == "torch":
        return "torch"
    interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
    if choice == "auto":
        if device.type != "cuda":
            return "torch"
        if _triton_available():
            return "triton"
        if not _warned_no_triton:
            log.warning("triton is not installed: paged gather/scatter fall back to torch (slower)")
            _warned_no_triton = True
        return "torch"
    if device.type != "cuda" and not interpreted:
        raise KernelError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    if not _triton_available():
        raise KernelError("the triton backend was requested but triton is not installed (extra 'triton')")
    return "triton"


def _module(name: str) -> ModuleType:
    module = _triton_modules.get(name)
    if module is None:
        module = importlib.import_module(f"kvstrata.kernels.{name}")
        _triton_modules[name] = module
    return module


def _run(
    op: Literal["gather", "scatter"],
    caches: PagedCaches,
    ids: torch.Tensor,
    spec: ChunkSpec,
    chunk: torch.Tensor,
    first_layer: int,
    backend: str | None,
) -> None:
    chosen = select_backend(caches.device, backend)
    if chosen == "triton" and spec.codec == "fp8" and not _has_fp8(caches.device):
        if (_default_backend if backend is None else backend) == "triton":
            raise KernelError("the fp8 Triton kernels need a GPU of compute capability 8.9 or newer")
        chosen = "torch"
    if chosen == "torch":
        getattr(reference, op)(caches, ids, spec, chunk, first_layer)
        return
    module = _module("triton_quant" if spec.quantised else "triton_paged")
    try:
        getattr(module, op)(caches, ids, spec, chunk, first_layer)
    except KVStrataError:
        raise
    except Exception as exc:  # triton compilation and launch errors have no common base but Exception
        raise KernelError(f"triton {op} failed: {exc}") from exc


def _has_fp8(device: torch.device) -> bool:
    """Whether the e4m3 conversions compile on ``device`` (the interpreter always has them)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def chunk_spec(caches: Caches, engine_layout: str, num_blocks: int, codec: str = "none") -> ChunkSpec:
    """The geometry (sizes, offsets) of a chunk of ``num_blocks`` blocks of ``caches`` in ``codec``."""
    return describe_caches(caches, engine_layout).spec(num_blocks, codec)


def _chunk_buffer(out: torch.Tensor | None, spec: ChunkSpec, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(spec.total_bytes, dtype=torch.uint8, device=device)
    if not out.is_contiguous():
        raise InvalidArgumentError("the chunk buffer must be contiguous")
    flat = out.view(-1).view(torch.uint8) if out.dtype != torch.uint8 else out.view(-1)
    if flat.numel() < spec.total_bytes:
        raise InvalidArgumentError(f"chunk buffer of {flat.numel()} bytes < the {spec.total_bytes} needed")
    if flat.device != device:
        raise InvalidArgumentError(f"chunk buffer on {flat.device}, cache on {device}")
    if flat.data_ptr() % 16:
        raise InvalidArgumentError("the chunk buffer must start on a 16-byte boundary")
    return flat[: spec.total_bytes]


def _write_header(chunk: torch.Tensor, spec: ChunkSpec) -> None:
    header = torch.frombuffer(bytearray(spec.header().pack()), dtype=torch.uint8)
    chunk[:HEADER_BYTES].copy_(header)


def read_header(chunk: torch.Tensor | bytes | bytearray | memoryview) -> ChunkHeader:
    """Decode a chunk's header (a device chunk costs one small synchronous copy: pass ``header=`` instead)."""
    if isinstance(chunk, torch.Tensor):
        flat = chunk.reshape(-1).view(torch.uint8) if chunk.dtype != torch.uint8 else chunk.reshape(-1)
        if flat.numel() < HEADER_BYTES:
            return ChunkHeader.unpack(b"")
        return ChunkHeader.unpack(flat[:HEADER_BYTES].cpu().numpy().tobytes())
    return ChunkHeader.unpack(chunk)


def gather(
    caches: Caches,
    block_ids: BlockIdsLike,
    *,
    engine_layout: str,
    codec: str = "none",
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Gather ``block_ids`` of every layer into one chunk (header + all layers); returns the chunk bytes.

    ``caches`` is the engine's per-layer paged tensors (or one stacked tensor); ``out`` an optional
    preallocated buffer (a pool slot) at least :attr:`ChunkSpec.total_bytes` long, on the cache's device.
    """
    paged = describe_caches(caches, engine_layout)
    ids = as_block_ids(block_ids, paged.num_engine_blocks)
    spec = paged.spec(ids.numel(), codec)
    chunk = _chunk_buffer(out, spec, paged.device)
    _write_header(chunk, spec)
    _run("gather", paged, ids, spec, chunk, 0, backend)
    return chunk


def gather_layer(
    cache: torch.Tensor,
    block_ids: BlockIdsLike,
    *,
    layer: int,
    num_layers: int,
    engine_layout: str,
    codec: str = "none",
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Gather one layer's blocks into its section of a ``num_layers``-layer chunk; layer 0 writes the header.

    Calling this for every layer on the same ``out`` produces exactly the chunk :func:`gather` makes.
    """
    paged = describe_caches([cache], engine_layout)
    ids = as_block_ids(block_ids, paged.num_engine_blocks)
    spec = paged.spec(ids.numel(), codec, num_layers=num_layers)
    spec.layer_offset(layer)  # range check
    chunk = _chunk_buffer(out, spec, paged.device)
    if layer == 0:
        _write_header(chunk, spec)
    _run("gather", paged, ids, spec, chunk, layer, backend)
    return chunk


def _checked(
    chunk: torch.Tensor, paged: PagedCaches, num_blocks: int, header: ChunkHeader | None, num_layers: int
) -> tuple[ChunkSpec, torch.Tensor]:
    if header is None:
        header = read_header(chunk)
    spec = paged.spec(num_blocks, header.codec, num_layers=num_layers)
    spec.check_header(header)
    return spec, _chunk_buffer(chunk, spec, paged.device)


def scatter(
    chunk: torch.Tensor,
    caches: Caches,
    block_ids: BlockIdsLike,
    *,
    engine_layout: str,
    header: ChunkHeader | None = None,
    backend: str | None = None,
) -> ChunkHeader:
    """Write a chunk made by :func:`gather` into ``block_ids`` of every layer, decoding its codec.

    ``header`` (from :func:`read_header` on a host copy) saves reading it from a device chunk.
    A block id of :data:`~kvstrata.kernels.paged.SKIP_BLOCK` (-1) leaves that block of the chunk unwritten:
    the engine already holds it (its local prefix hit ends inside the chunk).
    Returns the header the chunk was decoded with.
    """
    paged = describe_caches(caches, engine_layout)
    ids = as_block_ids(block_ids, paged.num_engine_blocks, allow_skip=True)
    spec, buf = _checked(chunk, paged, ids.numel(), header, len(paged.layers))
    _run("scatter", paged, ids, spec, buf, 0, backend)
    return spec.header()


def scatter_layer(
    chunk: torch.Tensor,
    cache: torch.Tensor,
    block_ids: BlockIdsLike,
    *,
    layer: int,
    engine_layout: str,
    header: ChunkHeader | None = None,
    backend: str | None = None,
) -> ChunkHeader:
    """Write layer ``layer``'s section of a chunk into ``block_ids`` of one layer's cache."""
    paged = describe_caches([cache], engine_layout)
    ids = as_block_ids(block_ids, paged.num_engine_blocks, allow_skip=True)
    if header is None:
        header = read_header(chunk)
    spec, buf = _checked(chunk, paged, ids.numel(), header, header.num_layers)
    spec.layer_offset(layer)  # range check
    _run("scatter", paged, ids, spec, buf, layer, backend)
    return header
