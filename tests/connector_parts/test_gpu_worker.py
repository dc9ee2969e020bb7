"""The worker half on CUDA paged KV caches in vLLM's GPU layout (marked ``gpu``; skipped without CUDA).

The caches are what vLLM's FlashAttention backend allocates: per layer a tensor of
``(2, num_blocks, block_size, num_kv_heads, head_size)`` (``kv_first_nhd``) on the GPU. The worker half is
driven directly, one engine step at a time, as vLLM's model runner drives the connector: ``start_load``
before the forward pass, then for each layer ``wait_for_layer_load`` (if the worker has one) before that
layer's attention reads its KV, and ``save`` after the forward pass. A request saves its prompt's chunks,
another loads them into other blocks, and every byte must be identical; once through an embedded Store
(pinned host tier) and once through a local ``kvstrata serve``.

Run on a GPU machine: ``pytest -m gpu tests/connector_parts``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from kvstrata.client import Client
from kvstrata.connector.backend import EmbeddedBackend
from kvstrata.connector.metadata import StepPlan
from kvstrata.connector.spec import EngineSpec, KeyChain
from kvstrata.connector.worker import WorkerSide, detect_engine_layout
from kvstrata.kernels import gather, scatter
from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from tests.connector_parts.helpers import (
    Req,
    Rig,
    blocks_bytes,
    make_caches,
    make_spec,
    new_step,
    servers_worker,
    tokens,
)
from tests.transport.servers import ServeProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

LAYOUT = "kv_first_nhd"
BLOCK = 16
CHUNK = 256  # the default chunk: 16 blocks
PROMPT = tokens(3 * CHUNK + 40)  # three full chunks and part of a fourth
NUM_BLOCKS = 128
A_BLOCKS = list(range(0, 52))  # request "a": 52 blocks hold its 808 tokens
B_BLOCKS = list(range(60, 112))  # request "b": other blocks, same prompt
FULL = 3 * CHUNK // BLOCK  # the blocks of the three full chunks


def _spec(request: pytest.FixtureRequest, dtype: str = "float16") -> EngineSpec:
    return make_spec(
        LAYOUT,
        model_id=request.node.nodeid,
        dtype=dtype,
        block_size=BLOCK,
        chunk_tokens=CHUNK,
        num_layers=4,
        num_kv_heads=4,
        head_size=128,
    )


def _layer_bytes(cache: torch.Tensor, blocks: list[int]) -> bytes:
    return bytes(cache[:, blocks].contiguous().view(torch.uint8).cpu().numpy().tobytes())


def _step(
    rig: Rig, plan: StepPlan, loaded: tuple[list[torch.Tensor], list[int], list[int]] | None = None
) -> None:
    """One engine step on the workers, layer by layer. ``loaded`` = (caches, source blocks, loaded blocks):
    each layer's loaded blocks must hold the source's KV by the time that layer's attention reads them."""
    for worker in rig.workers:
        worker.start_load(plan)
    for layer in range(rig.spec.num_layers):
        for worker in rig.workers:
            wait = getattr(worker, "wait_for_layer_load", None)
            if wait is not None:
                wait(layer)
        torch.cuda.synchronize()  # the layer's attention would run here
        if loaded is not None:
            caches, src, dst = loaded
            assert _layer_bytes(caches[layer], dst) == _layer_bytes(caches[layer], src), f"layer {layer}"
    for worker in rig.workers:
        worker.save(plan)
    torch.cuda.synchronize()
    rig.report()


def _answer(rig: Rig, req: Req) -> tuple[int | None, bool]:
    """Ask until the scheduler half answers (a lookup on the servers is ``None`` while pending)."""
    deadline = time.monotonic() + 10
    while (got := rig.scheduler.get_num_new_matched_tokens(req, 0))[0] is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return got


def _prefill_a(rig: Rig) -> None:
    req = Req("a", PROMPT)
    assert _answer(rig, req) == (0, False)
    rig.scheduler.update_state_after_alloc(req, A_BLOCKS, 0)
    plan = rig.plan(new_step("a", A_BLOCKS, 0, len(PROMPT)))
    assert len(plan.saves) == 3
    _step(rig, plan)


def test_the_harness_caches_and_the_kernels_on_the_device(request: pytest.FixtureRequest) -> None:
    """The harness's own ground: vLLM's GPU layout is recognised, and the kernels move a chunk on the
    device bit for bit (so a failure below is the worker's)."""
    spec = _spec(request)
    caches = make_caches(spec, NUM_BLOCKS, device="cuda")
    assert caches[0].shape == (2, NUM_BLOCKS, BLOCK, 4, 128) and caches[0].is_cuda
    assert detect_engine_layout(caches[0], spec) == LAYOUT
    worker = WorkerSide(spec, 0, EmbeddedBackend(Store([HostTier(64 << 20, 4 << 20)])))
    worker.register_kv_caches(caches)
    assert worker.enabled
    src, dst = A_BLOCKS[:16], B_BLOCKS[:16]
    chunk = gather(caches, src, engine_layout=LAYOUT)
    assert chunk.is_cuda and chunk.numel() == worker.chunk_bytes
    assert blocks_bytes(caches, LAYOUT, dst) != blocks_bytes(caches, LAYOUT, src)
    scatter(chunk, caches, dst, engine_layout=LAYOUT)
    torch.cuda.synchronize()
    assert blocks_bytes(caches, LAYOUT, dst) == blocks_bytes(caches, LAYOUT, src)
    worker.close()


@pytest.fixture
def embedded_rig(request: pytest.FixtureRequest) -> Iterator[tuple[Rig, list[torch.Tensor]]]:
    dtype = getattr(request, "param", "float16")
    spec = _spec(request, dtype)
    caches = make_caches(spec, NUM_BLOCKS, device="cuda")
    store = Store([HostTier(64 << 20, 4 << 20, pin_memory=True)])
    worker = WorkerSide(spec, 0, EmbeddedBackend(store))
    worker.register_kv_caches(caches)
    rig = Rig(spec, [worker])
    rig.report()
    yield rig, caches
    rig.close()


@pytest.mark.parametrize("embedded_rig", ["float16", "bfloat16"], indirect=True)
def test_embedded_save_then_load_into_other_blocks_is_bit_exact(
    embedded_rig: tuple[Rig, list[torch.Tensor]],
) -> None:
    rig, caches = embedded_rig
    worker = rig.workers[0]
    assert isinstance(worker.backend, EmbeddedBackend)
    _prefill_a(rig)
    chain = KeyChain(rig.spec)
    chain.extend(PROMPT, FULL)
    counters = dict(rig.scheduler.take_counters()[0])
    assert counters.get("save_errors", 0) == 0, counters
    assert all(worker.backend.store.contains(chain.chunk_keys(c)[0]) for c in range(3))
    source = blocks_bytes(caches, LAYOUT, A_BLOCKS[:FULL])
    assert blocks_bytes(caches, LAYOUT, B_BLOCKS[:FULL]) != source
    req = Req("b", PROMPT)
    assert _answer(rig, req) == (3 * CHUNK, False)
    rig.scheduler.update_state_after_alloc(req, B_BLOCKS, 3 * CHUNK)
    plan = rig.plan(new_step("b", B_BLOCKS, 3 * CHUNK, len(PROMPT) - 3 * CHUNK))
    _step(rig, plan, loaded=(caches, A_BLOCKS[:FULL], B_BLOCKS[:FULL]))
    assert worker.take_load_errors() == set()
    assert blocks_bytes(caches, LAYOUT, B_BLOCKS[:FULL]) == source


def test_servers_save_then_load_into_other_blocks_is_bit_exact(
    request: pytest.FixtureRequest, kvstrata_server: ServeProcess
) -> None:
    spec = _spec(request)
    worker, caches = servers_worker(spec, kvstrata_server.url, num_blocks=NUM_BLOCKS, device="cuda")
    client = Client([kvstrata_server.url])
    rig = Rig(spec, [worker], lookup=lambda keys: client.lookup_prefix(keys, timeout=2.0), lookup_timeout_s=5)
    try:
        rig.report()
        _prefill_a(rig)
        assert worker.backend.flush(30)
        rig.report()
        counters = dict(rig.scheduler.take_counters()[0])
        assert counters.get("save_errors", 0) == 0 and counters.get("saved_chunks") == 3, counters
        source = blocks_bytes(caches, LAYOUT, A_BLOCKS[:FULL])
        req = Req("b", PROMPT)
        assert _answer(rig, req) == (3 * CHUNK, True)
        rig.scheduler.update_state_after_alloc(req, B_BLOCKS, 3 * CHUNK)
        _step(rig, rig.plan(new_step("b", B_BLOCKS, 0, 0)))  # waiting for remote KV
        finished: set[str] = set()
        deadline = time.monotonic() + 30
        while not finished:
            assert time.monotonic() < deadline
            finished = worker.get_finished()
            time.sleep(0.005)
        assert finished == {"b"}
        assert worker.take_load_errors() == set()
        torch.cuda.synchronize()
        assert blocks_bytes(caches, LAYOUT, B_BLOCKS[:FULL]) == source
    finally:
        rig.close()
        client.close()
