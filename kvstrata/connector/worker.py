"""The worker half: moves chunks between the engine's paged KV cache and the backend.

One per TP rank, in the worker process (which is the scheduler's process only with the uni executor). It
follows the step plan (:class:`StepPlan`) the scheduler half made:

- **Loads.** A synchronous load (embedded store) runs in ``start_load_kv``, before the forward pass that
  needs it: the chunks are pinned in the store, scattered into the allocated blocks (``SKIP_BLOCK`` for the
  blocks the engine already holds) and unpinned, all within the call, so a pin never outlives it. An
  asynchronous load (servers) runs on the loader thread into staging buffers, is scattered there (the
  blocks belong to a request vLLM keeps waiting), and is reported finished through ``get_finished``.
  A chunk that is missing, corrupt (its header or checksum fails) or late is a load error: its blocks and
  every later block of the request are reported by ``get_block_ids_with_load_errors`` no later than the
  request's completion, so vLLM recomputes from there (``kv_load_failure_policy: recompute``).
- **Saves.** In ``wait_for_save``, after the forward pass: each planned chunk not already held is gathered
  (the kernels) straight into a store slot, or into a staging buffer that the servers backend pushes in the
  background. ``wait_for_save`` never waits for the network or the disk.
- **Reports.** ``report()`` returns the rank's cache changes (and, first, its whole catalog) for
  the scheduler half.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import torch

from kvstrata.connector.backend import Backend
from kvstrata.connector.metadata import LoadSpec, StepPlan, WorkerReport
from kvstrata.connector.spec import EngineSpec
from kvstrata.core.chunk import ChunkHandle, ChunkMeta
from kvstrata.errors import KVStrataError, LayoutError
from kvstrata.kernels import chunk_spec, gather, read_header, scatter
from kvstrata.kernels.paged import SKIP_BLOCK

__all__ = ["WorkerSide", "detect_engine_layout"]

log = logging.getLogger(__name__)


def detect_engine_layout(cache: torch.Tensor, spec: EngineSpec) -> str:
    """The engine layout name of one layer's paged KV tensor, from its shape and the model's geometry."""
    shape = tuple(cache.shape)
    bs, heads, head = spec.block_size, spec.num_kv_heads, spec.head_size
    candidates = {
        "cpu_packed": (heads, bs, 2 * head),
        "kv_first_nhd": (bs, heads, head),
        "kv_first_hnd": (heads, bs, head),
    }
    if len(shape) == 4 and shape[1:] == candidates["cpu_packed"]:
        return "cpu_packed"
    if len(shape) == 5 and shape[0] == 2:
        if shape[2:] == candidates["kv_first_nhd"]:
            return "kv_first_nhd"
        if shape[2:] == candidates["kv_first_hnd"]:
            return "kv_first_hnd"
    if len(shape) == 5 and shape[1] == 2:
        if shape[2:] == (bs, heads, head):
            return "kv_second_nhd"
        if shape[2:] == (heads, bs, head):
            return "kv_second_hnd"
    raise LayoutError(f"unrecognised KV cache shape {shape} (block {bs}, {heads} KV heads of {head})")


class WorkerSide:
    """The worker half of one TP rank."""

    def __init__(self, spec: EngineSpec, rank: int, backend: Backend, *, load_timeout_s: float = 5.0) -> None:
        self.spec = spec
        self.rank = rank
        self.backend = backend
        self._load_timeout = load_timeout_s
        self._caches: list[torch.Tensor] = []
        self._chunk_bytes = 0
        self._enabled = False
        self._snapshot_sent = False
        self._lock = threading.Lock()
        self._done_recving: set[str] = set()
        self._load_errors: dict[str, set[int]] = {}
        self._errors_to_report: set[int] = set()
        self._loads: queue.Queue[LoadSpec | None] = queue.Queue()
        self._loader: threading.Thread | None = None
        #: chunk-sized buffers on the caches' device, one per thread that uses one (saves run on vLLM's
        #: thread, asynchronous loads on the loader's): the kernels move KV between a cache and a chunk
        #: on the same device, and the backends' buffers live in host memory
        self._staging: dict[str, torch.Tensor] = {}
        self._meta = ChunkMeta(fingerprint=spec.layouts[rank].fingerprint, num_tokens=spec.chunk_tokens)

    # -- set-up ----------------------------------------------------------------------------------------
    def register_kv_caches(self, caches: Sequence[torch.Tensor]) -> None:
        """Learn the engine's per-layer paged tensors (in layer order) and check them against the spec."""
        caches = list(caches)
        if len(caches) != self.spec.num_layers:
            log.error(
                "kvstrata: %d KV cache layers, the model has %d; the connector stays off",
                len(caches),
                self.spec.num_layers,
            )
            return
        try:
            layout = detect_engine_layout(caches[0], self.spec)
        except LayoutError as exc:
            log.error("kvstrata: %s; the connector stays off", exc)
            return
        if layout != self.spec.engine_layout:
            log.error(
                "kvstrata: the KV cache is %s, the keys were made for %s; the connector stays off",
                layout,
                self.spec.engine_layout,
            )
            return
        self._caches = caches
        self._chunk_bytes = chunk_spec(caches, layout, self.spec.blocks_per_chunk).total_bytes
        self._enabled = True
        log.info(
            "kvstrata: rank %d registered %d layers (%s), %d bytes per %d-token chunk",
            self.rank,
            len(caches),
            layout,
            self._chunk_bytes,
            self.spec.chunk_tokens,
        )

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one stored chunk (header included); 0 before the caches are registered."""
        return self._chunk_bytes

    @property
    def enabled(self) -> bool:
        """Whether the caches were registered and match the spec."""
        return self._enabled

    # -- loads ------------------------------------------------------------------------------------------
    def start_load(self, plan: StepPlan) -> None:
        """Run this step's synchronous loads now; queue the asynchronous ones."""
        for load in plan.loads:
            if not self._enabled:
                self._fail_all(load)
                continue
            if load.asynchronous:
                self._ensure_loader()
                self._loads.put(load)
            else:
                self._load(load)

    def _ensure_loader(self) -> None:
        if self._loader is None:
            self._loader = threading.Thread(target=self._load_loop, name="kvstrata-load", daemon=True)
            self._loader.start()

    def _load_loop(self) -> None:
        while True:
            load = self._loads.get()
            if load is None:
                return
            try:
                self._load(load)
            except Exception:  # never lose a request: report it finished, with its blocks as errors
                log.exception("kvstrata: load of %s failed", load.req_id)
                self._fail_all(load)

    def _fail_all(self, load: LoadSpec) -> None:
        bad = {b for chunk in load.chunks for b in chunk.block_ids if b != SKIP_BLOCK}
        self.backend.count("load_errors")
        self._finish_load(load, bad)

    def _load(self, load: LoadSpec) -> None:
        start = time.perf_counter()
        keys = [chunk.keys[self.rank] for chunk in load.chunks]
        handles: list[ChunkHandle | None] = []
        bad: set[int] = set()
        loaded = 0
        try:
            handles = self.backend.load(keys, self._load_timeout)
            failed = False
            for chunk, handle in zip(load.chunks, handles, strict=True):
                if not failed and handle is not None:
                    try:
                        self._scatter(handle, chunk.block_ids)
                        loaded += 1
                        continue
                    except KVStrataError as exc:  # corrupt or foreign: a miss, never wrong KV
                        log.warning("kvstrata: chunk of %s refused: %s", load.req_id, exc)
                        self.backend.count("corrupt_chunks")
                        # Dropped, so that it is neither offered again nor kept from being saved anew.
                        self.backend.discard(handle.key)
                if not failed:
                    self.backend.count("missing_chunks" if handle is None else "load_errors")
                failed = True  # this chunk and every later one recompute
                bad.update(b for b in chunk.block_ids if b != SKIP_BLOCK)
        finally:
            for handle in handles:
                if handle is not None:
                    handle.release()
        self.backend.count("loaded_chunks", loaded)
        self.backend.count("loaded_bytes", loaded * self._chunk_bytes)
        self.backend.count("load_seconds", time.perf_counter() - start)
        self._finish_load(load, bad)

    def _device_buffer(self, use: str, like: torch.Tensor) -> torch.Tensor | None:
        """The staging buffer for ``use`` when ``like`` is not on the caches' device, else ``None``."""
        device = self._caches[0].device
        if like.device == device:
            return None
        buffer = self._staging.get(use)
        if buffer is None:
            buffer = torch.empty(self._chunk_bytes, dtype=torch.uint8, device=device)
            self._staging[use] = buffer
        return buffer

    def _scatter(self, handle: ChunkHandle, block_ids: Sequence[int]) -> None:
        data = handle.data
        if data.numel() != self._chunk_bytes:
            raise LayoutError(f"a chunk of {data.numel()} bytes where {self._chunk_bytes} are expected")
        header = read_header(data)  # before any copy: from host memory, no device synchronisation
        staging = self._device_buffer("load", data)
        if staging is not None:
            staging.copy_(data.reshape(-1).view(torch.uint8))
            data = staging
        scatter(data, self._caches, list(block_ids), engine_layout=self.spec.engine_layout, header=header)

    def _finish_load(self, load: LoadSpec, bad: set[int]) -> None:
        with self._lock:
            if bad:
                self._load_errors[load.req_id] = bad
                if not load.asynchronous:
                    self._errors_to_report |= bad
                    del self._load_errors[load.req_id]
            if load.asynchronous:
                self._done_recving.add(load.req_id)

    def get_finished(self) -> set[str]:
        """The asynchronous loads done since the last call (their errors go out in this step too)."""
        with self._lock:
            done, self._done_recving = self._done_recving, set()
            for req_id in done:
                self._errors_to_report |= self._load_errors.pop(req_id, set())
        return done

    def take_load_errors(self) -> set[int]:
        """Block ids whose load failed, to report to vLLM."""
        with self._lock:
            out, self._errors_to_report = self._errors_to_report, set()
        return out

    # -- saves ------------------------------------------------------------------------------------------
    def save(self, plan: StepPlan) -> None:
        """Gather and hand over this step's planned chunks (after the forward pass wrote them)."""
        if not self._enabled:
            return
        for item in plan.saves:
            key = item.keys[self.rank]
            if self.backend.contains(key):
                self.backend.count("saves_skipped_held")
                continue
            meta = ChunkMeta(
                block_keys=item.block_keys[self.rank],
                fingerprint=self._meta.fingerprint,
                num_tokens=item.num_tokens,
            )
            ids = list(item.block_ids)

            def fill(buffer: torch.Tensor, ids: list[int] = ids) -> None:
                staging = self._device_buffer("save", buffer)
                out = buffer if staging is None else staging[: buffer.numel()]
                gather(self._caches, ids, engine_layout=self.spec.engine_layout, out=out)
                if staging is not None:
                    buffer.copy_(out)  # synchronous: the buffer is published next

            try:
                if self.backend.save(key, self._chunk_bytes, meta, fill):
                    self.backend.count("save_calls")
            except Exception as exc:  # a kernel or layout error: the chunk is simply not saved
                log.warning("kvstrata: save of a chunk of %s failed: %s", item.req_id, exc)
                self.backend.count("save_errors")

    # -- reports ----------------------------------------------------------------------------------------
    def report(self) -> WorkerReport:
        """This step's report for the scheduler half."""
        if not self._snapshot_sent:
            self._snapshot_sent = True
            self.backend.take_changes()  # the snapshot below includes them
            return WorkerReport(
                rank=self.rank,
                snapshot=True,
                changes=tuple(self.backend.snapshot()),
                counters=self.backend.take_counters(),
            )
        return WorkerReport(
            rank=self.rank, changes=tuple(self.backend.take_changes()), counters=self.backend.take_counters()
        )

    def close(self) -> None:
        """Stop the loader and close the backend."""
        if self._loader is not None:
            self._loads.put(None)
            self._loader.join(5.0)
        self.backend.close()
