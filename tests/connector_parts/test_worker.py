"""The worker half on CPU torch paged caches, over an embedded Store: saves gathered from the cache, loads
scattered into other blocks bit for bit, and every failure to load reported as load errors (never wrong KV).

The caches are in vLLM's CPU layout (``cpu_packed``: per layer ``(num_blocks, num_kv_heads, block_size,
2 * head_size)``, views of one buffer as the CPU build allocates them) and in the GPU layout
(``kv_first_nhd``), here on the CPU through the kernels' torch reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvstrata.connector.backend import EmbeddedBackend
from kvstrata.connector.metadata import ChunkLoad, LoadSpec, StepPlan
from kvstrata.connector.spec import EngineSpec, KeyChain
from kvstrata.connector.worker import WorkerSide, detect_engine_layout
from kvstrata.errors import LayoutError
from kvstrata.kernels import HEADER_BYTES
from kvstrata.kernels.paged import SKIP_BLOCK
from kvstrata.kvstore.disk import DiskTier
from kvstrata.kvstore.store import Store
from tests.connector_parts.helpers import (
    NewRequestData,
    Req,
    Rig,
    SchedulerOutput,
    blocks_bytes,
    cached_step,
    embedded_worker,
    host_store,
    layer_shape,
    make_caches,
    make_spec,
    new_step,
    offer,
    prefill,
    tokens,
)

pytestmark = pytest.mark.timeout(60)

PROMPT = tokens(100)  # three full 32-token chunks and a partial one
A_BLOCKS = list(range(0, 7))
B_BLOCKS = list(range(8, 15))
#: B's blocks of each of the three chunks
B_CHUNKS = [B_BLOCKS[0:2], B_BLOCKS[2:4], B_BLOCKS[4:6]]
C_BLOCKS = list(range(16, 23))


def _chain(spec: EngineSpec) -> KeyChain:
    chain = KeyChain(spec)
    chain.extend(PROMPT, 6)
    return chain


def _store(worker: WorkerSide) -> Store:
    assert isinstance(worker.backend, EmbeddedBackend)
    return worker.backend.store


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A rig whose store holds PROMPT's three chunks, saved from A_BLOCKS by request "a"."""
    spec = make_spec()
    worker, _ = embedded_worker(spec, one_buffer=True)
    rig = Rig(spec, [worker])
    rig.report()
    assert len(prefill(rig, Req("a", PROMPT), A_BLOCKS).saves) == 3
    yield rig
    rig.close()


def _caches(rig: Rig, rank: int = 0) -> list[torch.Tensor]:
    return rig.workers[rank]._caches


def _load(
    rig: Rig, req_id: str = "b", blocks: list[int] = B_BLOCKS, computed: int = 0
) -> tuple[set[int], dict[str, float]]:
    """A request for PROMPT loads what the scheduler offers; returns the load errors and the counters."""
    req = Req(req_id, PROMPT)
    external, asynchronous = offer(rig, req, computed)
    assert external is not None and external > 0 and not asynchronous
    rig.scheduler.update_state_after_alloc(req, blocks, external)
    plan = rig.plan(new_step(req_id, blocks, computed + external, len(PROMPT) - computed - external))
    assert len(plan.loads) == 1
    worker = rig.workers[0]
    worker.start_load(plan)
    errors = worker.take_load_errors()
    rig.load_errors(errors)
    report = worker.report()
    rig.scheduler.apply_reports([report])
    return errors, dict(report.counters)


def _forward(caches: list[torch.Tensor], engine_layout: str, blocks: list[int]) -> None:
    """What the forward pass writes into ``blocks`` for PROMPT: the KV request "a" computed (A_BLOCKS)."""
    for block in blocks:
        src = A_BLOCKS[B_BLOCKS.index(block)] if block in B_BLOCKS else A_BLOCKS[C_BLOCKS.index(block)]
        for cache in caches:
            if engine_layout.startswith("kv_first"):
                cache[:, block] = cache[:, src]
            else:
                cache[block] = cache[src]


@pytest.mark.parametrize(
    ("engine_layout", "one_buffer", "dtype"),
    [
        ("cpu_packed", True, "float16"),  # vLLM's CPU build
        ("cpu_packed", True, "bfloat16"),
        ("cpu_packed", False, "float32"),
        ("kv_first_nhd", False, "float16"),  # vLLM's GPU layout, on the CPU
        ("kv_first_nhd", True, "bfloat16"),
    ],
)
def test_save_then_load_into_other_blocks_is_bit_exact(
    engine_layout: str, one_buffer: bool, dtype: str
) -> None:
    spec = make_spec(engine_layout, dtype=dtype)
    worker, caches = embedded_worker(spec, one_buffer=one_buffer)
    assert detect_engine_layout(caches[0], spec) == engine_layout
    rig = Rig(spec, [worker])
    try:
        rig.report()
        prefill(rig, Req("a", PROMPT), A_BLOCKS)
        source = blocks_bytes(caches, engine_layout, A_BLOCKS[:6])
        partial_before = blocks_bytes(caches, engine_layout, B_BLOCKS[6:])
        assert blocks_bytes(caches, engine_layout, B_BLOCKS[:6]) != source  # random: the load must work
        errors, counters = _load(rig)
        assert errors == set()
        assert blocks_bytes(caches, engine_layout, B_BLOCKS[:6]) == source
        assert blocks_bytes(caches, engine_layout, B_BLOCKS[6:]) == partial_before  # the partial block
        assert counters["loaded_chunks"] == 3
        assert counters["loaded_bytes"] == 3 * worker.chunk_bytes
        assert worker.chunk_bytes == HEADER_BYTES + spec.layouts[0].chunk_bytes
    finally:
        rig.close()


def test_a_local_prefix_block_is_left_alone(rig: Rig) -> None:
    caches = _caches(rig)
    source = blocks_bytes(caches, "cpu_packed", A_BLOCKS[:6])
    local = blocks_bytes(caches, "cpu_packed", B_BLOCKS[:1])  # vLLM's own prefix cache holds block 0
    errors, _ = _load(rig, computed=16)
    assert errors == set()
    assert blocks_bytes(caches, "cpu_packed", B_BLOCKS[:1]) == local
    assert blocks_bytes(caches, "cpu_packed", B_BLOCKS[1:6]) == source[1:]


def _corrupt_header(store: Store, key: bytes) -> None:
    """Flip a byte of a chunk's header where it lies, in the host tier."""
    handle = store.acquire(key)
    assert handle is not None
    try:
        handle.data[8] ^= 0xFF
    finally:
        handle.release()


@pytest.mark.parametrize("bad_chunk", [0, 1, 2])
@pytest.mark.parametrize("how", ["corrupt", "missing"])
def test_a_bad_chunk_fails_its_blocks_and_every_later_block(rig: Rig, bad_chunk: int, how: str) -> None:
    caches = _caches(rig)
    store = _store(rig.workers[0])
    key = _chain(rig.spec).chunk_keys(bad_chunk)[0]
    source = blocks_bytes(caches, "cpu_packed", A_BLOCKS[:6])
    req = Req("b", PROMPT)
    assert offer(rig, req) == (96, False)  # offered while the chunk was still good
    if how == "corrupt":
        _corrupt_header(store, key)
    else:
        assert store.remove(key)
    bad_before = blocks_bytes(caches, "cpu_packed", B_CHUNKS[bad_chunk])
    rig.scheduler.update_state_after_alloc(req, B_BLOCKS, 96)
    worker = rig.workers[0]
    worker.start_load(rig.plan(new_step("b", B_BLOCKS, 96, 4)))
    expected = {b for chunk in B_CHUNKS[bad_chunk:] for b in chunk}
    assert worker.take_load_errors() == expected
    assert worker.take_load_errors() == set()  # reported once
    good = 2 * bad_chunk
    assert blocks_bytes(caches, "cpu_packed", B_BLOCKS[:good]) == source[:good]
    assert blocks_bytes(caches, "cpu_packed", B_CHUNKS[bad_chunk]) == bad_before  # nothing written
    counters = worker.report().counters
    assert counters["corrupt_chunks" if how == "corrupt" else "missing_chunks"] == 1
    assert counters["loaded_chunks"] == bad_chunk


def test_errors_leave_out_the_blocks_vllm_holds(rig: Rig) -> None:
    _corrupt_header(_store(rig.workers[0]), _chain(rig.spec).chunk_keys(0)[0])
    errors, counters = _load(rig, computed=16)
    assert errors == set(B_BLOCKS[1:6])  # block 8 (SKIP_BLOCK in the plan) was never the connector's
    assert counters["corrupt_chunks"] == 1


def _file_of(directory: Path, key: bytes) -> Path:
    (path,) = directory.rglob(f"{key.hex()}*")
    return path


def test_a_corrupt_disk_chunk_is_a_miss_and_the_catalog_heals(tmp_path: Path) -> None:
    spec = make_spec()
    store = Store([DiskTier(tmp_path / "disk", 16 << 20)])
    worker = WorkerSide(spec, 0, EmbeddedBackend(store))
    caches = make_caches(spec, 24)
    worker.register_kv_caches(caches)
    rig = Rig(spec, [worker])
    try:
        rig.report()
        prefill(rig, Req("a", PROMPT), A_BLOCKS)
        chain = _chain(spec)
        path = _file_of(tmp_path / "disk", chain.chunk_keys(1)[0])
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0x55  # in the payload: only the checksum can tell
        path.write_bytes(bytes(raw))
        errors, counters = _load(rig)
        assert errors == set(B_BLOCKS[2:6])
        assert counters["missing_chunks"] == 1  # the disk tier refused it: a miss
        assert not path.exists()
        # The tier dropped it and said so: the next request is offered chunk 0 only, and saves chunk 1 again.
        req = Req("c", PROMPT)
        assert offer(rig, req) == (32, False)
        rig.scheduler.update_state_after_alloc(req, C_BLOCKS, 32)
        plan = rig.plan(new_step("c", C_BLOCKS, 32, 68))
        worker.start_load(plan)
        _forward(caches, "cpu_packed", C_BLOCKS[2:])
        worker.save(plan)
        rig.report()
        assert [s.keys for s in plan.saves] == [chain.chunk_keys(1)]
        assert worker.take_load_errors() == set()
        errors, _ = _load(rig, "d")
        assert errors == set()
        assert blocks_bytes(caches, "cpu_packed", B_BLOCKS[:6]) == blocks_bytes(
            caches, "cpu_packed", A_BLOCKS[:6]
        )
    finally:
        rig.close()


def test_a_chunk_refused_as_corrupt_is_not_offered_forever(rig: Rig) -> None:
    worker = rig.workers[0]
    caches = _caches(rig)
    _corrupt_header(_store(worker), _chain(rig.spec).chunk_keys(1)[0])
    errors, _ = _load(rig)
    assert errors == set(B_BLOCKS[2:6])
    # vLLM rewinds "b" to its first bad block and recomputes from there: the KV is right again.
    plan = rig.plan(cached_step("b", 32, 68))
    worker.start_load(plan)
    _forward(caches, "cpu_packed", B_BLOCKS[2:])
    worker.save(plan)
    rig.report()
    rig.scheduler.request_finished(Req("b", PROMPT))
    errors, _ = _load(rig, "c", C_BLOCKS)  # a later request with the same prompt
    assert errors == set()
    assert blocks_bytes(caches, "cpu_packed", C_BLOCKS[:6]) == blocks_bytes(
        caches, "cpu_packed", A_BLOCKS[:6]
    )


def test_two_requests_saving_one_chunk_in_one_step_store_it_once() -> None:
    spec = make_spec()
    worker, _ = embedded_worker(spec)
    rig = Rig(spec, [worker])
    try:
        rig.report()
        for name in ("a", "b"):
            req = Req(name, PROMPT)
            assert offer(rig, req) == (0, False)
            rig.scheduler.update_state_after_alloc(req, A_BLOCKS if name == "a" else B_BLOCKS, 0)
        out = SchedulerOutput(
            scheduled_new_reqs=[NewRequestData("a", (A_BLOCKS,), 0), NewRequestData("b", (B_BLOCKS,), 0)],
            num_scheduled_tokens={"a": 100, "b": 100},
        )
        plan = rig.plan(out)
        assert len(plan.saves) == 6  # neither is known held yet
        worker.save(plan)
        counters = worker.report().counters
        assert counters["save_calls"] == 3
        assert counters["saves_skipped_held"] == 3
    finally:
        rig.close()


def test_each_tp_rank_saves_and_loads_its_own_shard() -> None:
    spec = make_spec("kv_first_nhd", tp_size=2)
    pairs = [embedded_worker(spec, rank) for rank in range(2)]
    rig = Rig(spec, [w for w, _ in pairs])
    try:
        rig.report()
        prefill(rig, Req("a", PROMPT), A_BLOCKS)
        chain = _chain(spec)
        for rank, (worker, _) in enumerate(pairs):
            keys = {chain.chunk_keys(c)[rank] for c in range(3)}
            assert set(_store(worker).tiers[0].keys()) == keys
        req = Req("b", PROMPT)
        assert offer(rig, req) == (96, False)
        rig.scheduler.update_state_after_alloc(req, B_BLOCKS, 96)
        rig.step(new_step("b", B_BLOCKS, 96, 4))
        assert rig.last_load_errors == set()
        for _, caches in pairs:
            assert blocks_bytes(caches, "kv_first_nhd", B_BLOCKS[:6]) == blocks_bytes(
                caches, "kv_first_nhd", A_BLOCKS[:6]
            )
        assert blocks_bytes(pairs[0][1], "kv_first_nhd", [8]) != blocks_bytes(
            pairs[1][1], "kv_first_nhd", [8]
        )
    finally:
        rig.close()


@pytest.mark.parametrize("what", ["layout", "layers", "geometry"])
def test_caches_that_do_not_match_the_spec_turn_the_worker_off(what: str) -> None:
    spec = make_spec()
    if what == "layout":
        caches = make_caches(make_spec("kv_first_nhd"), 24)
    elif what == "layers":
        caches = make_caches(spec, 24)[:1]
    else:
        caches = make_caches(make_spec(head_size=32), 24)
    worker = WorkerSide(spec, 0, EmbeddedBackend(host_store()))
    worker.register_kv_caches(caches)
    assert not worker.enabled and worker.chunk_bytes == 0
    keys = (bytes(16),)
    plan = StepPlan(
        loads=(
            LoadSpec("sync", (ChunkLoad(keys, (SKIP_BLOCK, 3)), ChunkLoad(keys, (4, 5)))),
            LoadSpec("async", (ChunkLoad(keys, (6, 7)),), asynchronous=True),
        )
    )
    worker.start_load(plan)
    assert worker.get_finished() == {"async"}  # never lost: finished, with its blocks as errors
    assert worker.take_load_errors() == {3, 4, 5, 6, 7}
    worker.save(plan)  # nothing to do, no error
    worker.close()


def test_detect_engine_layout() -> None:
    spec = make_spec()
    for layout in ("cpu_packed", "kv_first_nhd", "kv_first_hnd", "kv_second_nhd", "kv_second_hnd"):
        shaped = make_spec(layout)
        assert detect_engine_layout(torch.empty(layer_shape(shaped, 5)), spec) == layout
    with pytest.raises(LayoutError, match="unrecognised KV cache shape"):
        detect_engine_layout(torch.empty(5, 16, 2, 16), spec)


def test_the_first_report_is_a_snapshot_of_what_the_store_holds() -> None:
    spec = make_spec()
    store = host_store()
    key = bytes(range(16))
    store.put(key, torch.zeros(64, dtype=torch.uint8))
    worker, _ = embedded_worker(spec, store=store)
    first = worker.report()
    assert first.snapshot and first.rank == 0
    assert [(c.kind, c.tier, c.keys) for c in first.changes] == [("stored", "host", (key,))]
    assert store.remove(key)
    second = worker.report()
    assert not second.snapshot
    assert [(c.kind, c.keys) for c in second.changes] == [("removed", (key,))]
    worker.close()
