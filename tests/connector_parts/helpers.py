"""What the connector's halves need from vLLM, built by hand, and a small step loop that wires them.

``SchedulerSide`` takes ``Any`` for vLLM's objects and reads only a few attributes of each: the stand-ins
below have exactly those (``tests/connector_parts/test_real_request.py`` checks them against vLLM's own
``Request`` where vLLM is installed). Everything else here is real: EngineSpec, SchedulerSide, WorkerSide,
the backends, Store and its tiers, the kernels, the msgpack plans and reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstrata.connector.backend import EmbeddedBackend
from kvstrata.connector.metadata import StepPlan, decode_plan, decode_report, encode
from kvstrata.connector.scheduler import SchedulerSide
from kvstrata.connector.spec import EngineSpec
from kvstrata.connector.worker import WorkerSide
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store

BLOCK = 16
CHUNK = 32  # two blocks per chunk: small enough to see chunk alignment in every test


def make_spec(
    engine_layout: str = "cpu_packed",
    *,
    tp_size: int = 1,
    block_size: int = BLOCK,
    chunk_tokens: int = CHUNK,
    model_id: str = "tiny-model",
    dtype: str = "float16",
    num_layers: int = 2,
    num_kv_heads: int = 2,
    head_size: int = 16,
    tenant_salt: str = "",
) -> EngineSpec:
    """A small engine geometry (a chunk is a few KiB)."""
    return EngineSpec(
        model_id=model_id,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        dtype=dtype,
        block_size=block_size,
        chunk_tokens=chunk_tokens,
        tp_size=tp_size,
        engine_layout=engine_layout,
        tenant_salt=tenant_salt,
    )


# -- vLLM's request and scheduler output, as far as the scheduler half reads them ----------------------


@dataclass
class LoRA:
    """``request.lora_request`` (only its name is read)."""

    lora_name: str


@dataclass
class Req:
    """The attributes of ``vllm.v1.request.Request`` that the scheduler half reads."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    mm_features: list[Any] = field(default_factory=list)
    prompt_embeds: Any = None
    lora_request: LoRA | None = None
    cache_salt: str | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def decode(self, *tokens: int) -> None:
        """Append sampled tokens (decode)."""
        self.output_token_ids.extend(tokens)


@dataclass
class NewRequestData:
    """``scheduler_output.scheduled_new_reqs[i]``."""

    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """``scheduler_output.scheduled_cached_reqs`` (0.14+: ``resumed_req_ids`` is a set)."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)


@dataclass
class SchedulerOutput:
    """``vllm.v1.core.sched.output.SchedulerOutput``, as far as ``build_plan`` reads it."""

    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_req_ids: set[str] = field(default_factory=set)


def new_step(req_id: str, block_ids: Sequence[int], computed: int, scheduled: int) -> SchedulerOutput:
    """A step that schedules a new request: ``computed`` tokens are there already, ``scheduled`` run now."""
    return SchedulerOutput(
        scheduled_new_reqs=[NewRequestData(req_id, (list(block_ids),), computed)],
        num_scheduled_tokens={req_id: scheduled},
    )


def cached_step(
    req_id: str, computed: int, scheduled: int, new_blocks: Sequence[int] = (), *, resumed: bool = False
) -> SchedulerOutput:
    """A later step of a running (or, ``resumed``, preempted) request."""
    return SchedulerOutput(
        scheduled_cached_reqs=CachedRequestData(
            [req_id],
            [(list(new_blocks),) if new_blocks else None],
            [computed],
            {req_id} if resumed else set(),
        ),
        num_scheduled_tokens={req_id: scheduled},
    )


def tokens(n: int, start: int = 1000) -> list[int]:
    """``n`` distinct token ids."""
    return list(range(start, start + n))


# -- paged KV caches -------------------------------------------------------------------------------------


def layer_shape(spec: EngineSpec, num_blocks: int) -> tuple[int, ...]:
    """One layer's paged tensor in ``spec.engine_layout`` (vLLM's CPU build: ``cpu_packed``)."""
    bs, heads, head = spec.block_size, spec.num_kv_heads, spec.head_size
    return {
        "cpu_packed": (num_blocks, heads, bs, 2 * head),
        "kv_first_nhd": (2, num_blocks, bs, heads, head),
        "kv_first_hnd": (2, num_blocks, heads, bs, head),
        "kv_second_nhd": (num_blocks, 2, bs, heads, head),
        "kv_second_hnd": (num_blocks, 2, heads, bs, head),
    }[spec.engine_layout]


def make_caches(
    spec: EngineSpec,
    num_blocks: int,
    *,
    device: str | torch.device = "cpu",
    one_buffer: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-layer paged caches full of random KV: separate tensors, or (``one_buffer``, as vLLM's CPU build
    allocates them) views of one tensor."""
    gen = torch.Generator().manual_seed(seed)
    shape = layer_shape(spec, num_blocks)
    dtype = getattr(torch, spec.dtype)
    if one_buffer:
        whole = (torch.randn((spec.num_layers, *shape), generator=gen) * 3).to(dtype).to(device)
        return list(whole.unbind(0))
    return [(torch.randn(shape, generator=gen) * 3).to(dtype).to(device) for _ in range(spec.num_layers)]


def block_bytes(caches: Sequence[torch.Tensor], engine_layout: str, block: int) -> bytes:
    """Every layer's K and V of one block, as bytes (for exact comparison)."""
    parts = []
    for cache in caches:
        view = cache[:, block] if engine_layout.startswith("kv_first") else cache[block]
        parts.append(view.contiguous().view(torch.uint8).reshape(-1).cpu())
    return bytes(torch.cat(parts).numpy().tobytes())


def blocks_bytes(caches: Sequence[torch.Tensor], engine_layout: str, blocks: Sequence[int]) -> list[bytes]:
    """:func:`block_bytes` of each block."""
    return [block_bytes(caches, engine_layout, b) for b in blocks]


def host_store(capacity: int = 8 << 20, slot: int = 64 << 10) -> Store:
    """A Store with one host tier (unpinned, so that it runs anywhere)."""
    return Store([HostTier(capacity, slot, pin_memory=False)])


# -- the step loop ----------------------------------------------------------------------------------------


class Rig:
    """One scheduler half and one worker half per TP rank, wired as vLLM's step loop wires them.

    Plans and reports cross as msgpack bytes, as they do between vLLM's processes. ``step`` is one engine
    step: the scheduler's plan, the workers' loads (before the forward pass), their saves (after it), and
    their load errors and reports back to the scheduler.
    """

    def __init__(self, spec: EngineSpec, workers: Sequence[WorkerSide], **scheduler_kwargs: Any) -> None:
        self.spec = spec
        self.workers = list(workers)
        self.scheduler = SchedulerSide(spec, **scheduler_kwargs)
        #: the load errors the workers reported in the last ``step``
        self.last_load_errors: set[int] = set()

    def load_errors(self, block_ids: set[int]) -> None:
        """vLLM's ``invalid_block_ids`` back to the scheduler half, as the facade hands them over (where
        the scheduler half takes them)."""
        take = getattr(self.scheduler, "load_failed", None)
        if take is not None and block_ids:
            take(block_ids)

    def report(self) -> None:
        """The workers' reports of this step, folded into the scheduler's catalog."""
        payload = encode([worker.report() for worker in self.workers])
        self.scheduler.apply_reports(decode_report(payload))

    def plan(self, output: SchedulerOutput) -> StepPlan:
        """The scheduler's plan for ``output``, as the workers decode it."""
        return decode_plan(encode(self.scheduler.build_plan(output)))

    def step(self, output: SchedulerOutput) -> StepPlan:
        """One engine step; returns the plan the workers ran."""
        plan = self.plan(output)
        for worker in self.workers:
            worker.start_load(plan)
        for worker in self.workers:
            worker.save(plan)
        self.last_load_errors = set().union(*(worker.take_load_errors() for worker in self.workers))
        self.load_errors(self.last_load_errors)
        self.report()
        return plan

    def close(self) -> None:
        self.scheduler.close()
        for worker in self.workers:
            worker.close()


def embedded_worker(
    spec: EngineSpec,
    rank: int = 0,
    *,
    num_blocks: int = 24,
    store: Store | None = None,
    one_buffer: bool = False,
    seed: int = 0,
) -> tuple[WorkerSide, list[torch.Tensor]]:
    """A worker half over a host-tier Store, with registered random CPU caches."""
    worker = WorkerSide(spec, rank, EmbeddedBackend(store if store is not None else host_store()))
    caches = make_caches(spec, num_blocks, one_buffer=one_buffer, seed=seed + rank)
    worker.register_kv_caches(caches)
    assert worker.enabled
    return worker, caches


def offer(rig: Rig, req: Req, computed: int = 0) -> tuple[int | None, bool]:
    """``get_num_new_matched_tokens`` of ``req``."""
    return rig.scheduler.get_num_new_matched_tokens(req, computed)


def prefill(rig: Rig, req: Req, block_ids: Sequence[int], computed: int = 0) -> StepPlan:
    """Admit ``req`` as vLLM does (ask, allocate, plan) and run its whole prompt in one step."""
    external, _ = offer(rig, req, computed)
    assert external is not None
    rig.scheduler.update_state_after_alloc(req, list(block_ids), external)
    done = computed + external
    return rig.step(new_step(req.request_id, block_ids, done, req.num_tokens - done))


def servers_worker(
    spec: EngineSpec,
    url: str,
    rank: int = 0,
    *,
    num_blocks: int = 24,
    max_pending_bytes: int = 16 << 20,
    load_timeout_s: float = 5.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **client_kwargs: Any,
) -> tuple[WorkerSide, list[torch.Tensor]]:
    """A worker half over cache servers (its own Client), with registered random caches on ``device``."""
    from kvstrata.client import Client
    from kvstrata.connector.backend import ServersBackend
    from kvstrata.kernels import chunk_spec

    caches = make_caches(spec, num_blocks, device=device, seed=seed + rank)
    chunk_bytes = chunk_spec(caches, spec.engine_layout, spec.blocks_per_chunk).total_bytes
    backend = ServersBackend(Client([url], **client_kwargs), chunk_bytes, max_pending_bytes)
    worker = WorkerSide(spec, rank, backend, load_timeout_s=load_timeout_s)
    worker.register_kv_caches(caches)
    assert worker.enabled and worker.chunk_bytes == chunk_bytes
    return worker, caches
