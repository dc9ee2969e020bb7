"""The scheduler half with embedded workers: what it offers vLLM, what it plans, and what it learns from the
workers' reports. Real worker halves over real Stores feed it (Rig), so its catalog is what workers send."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstrata.connector.backend import EmbeddedBackend
from kvstrata.connector.metadata import TierChange, WorkerReport
from kvstrata.connector.spec import KeyChain
from kvstrata.connector.worker import WorkerSide
from kvstrata.kernels.paged import SKIP_BLOCK
from kvstrata.kvstore.disk import DiskTier
from kvstrata.kvstore.store import Store
from tests.connector_parts.helpers import (
    BLOCK,
    CHUNK,
    LoRA,
    Req,
    Rig,
    cached_step,
    embedded_worker,
    make_caches,
    make_spec,
    new_step,
    offer,
    prefill,
    tokens,
)

pytestmark = pytest.mark.timeout(60)

PROMPT = tokens(100)  # three full chunks (96 tokens) and a partial one
A_BLOCKS = list(range(0, 7))
B_BLOCKS = list(range(8, 15))


@pytest.fixture
def rig() -> Iterator[Rig]:
    spec = make_spec()
    worker, _ = embedded_worker(spec)
    rig = Rig(spec, [worker])
    rig.report()  # the workers' first report: their catalog (empty)
    yield rig
    rig.close()


@pytest.fixture
def warm(rig: Rig) -> Rig:
    """A rig whose store holds the chunks of PROMPT (request "a" ran it)."""
    plan = prefill(rig, Req("a", PROMPT), A_BLOCKS)
    assert len(plan.saves) == 3
    return rig


@pytest.mark.parametrize(
    ("length", "diverge", "expected"),
    [
        (100, None, 96),  # every held chunk; 4 tokens left to compute
        (97, None, 96),  # 96 tokens held, one left
        (96, None, 64),  # a full-prompt hit would leave nothing to compute: one chunk less
        (80, None, 64),  # a partial chunk never counts
        (31, None, 0),
        (200, None, 96),  # a longer prompt with the same start
        (100, 40, 32),  # diverges inside chunk 1
        (100, 0, 0),
    ],
)
def test_hit_is_chunk_aligned_and_leaves_a_token(
    warm: Rig, length: int, diverge: int | None, expected: int
) -> None:
    toks = (PROMPT + tokens(200, start=5000))[:length]
    if diverge is not None:
        toks[diverge] = 7
    req = Req("b", toks)
    got, asynchronous = offer(warm, req)
    assert (got, asynchronous) == (expected, False)
    assert got is not None and got % CHUNK == 0 and got <= req.num_tokens - 1


def test_local_prefix_is_subtracted_and_loads_skip_the_local_blocks(warm: Rig) -> None:
    req = Req("b", PROMPT)
    assert offer(warm, req, 16) == (80, False)  # one block held by vLLM itself
    assert offer(warm, req, 96) == (0, False)
    assert offer(warm, req, 112) == (0, False)
    assert offer(warm, req, 16) == (80, False)
    warm.scheduler.update_state_after_alloc(req, B_BLOCKS, 80)
    plan = warm.plan(new_step("b", B_BLOCKS, 96, 4))
    (load,) = plan.loads
    assert load.req_id == "b" and not load.asynchronous
    assert [chunk.block_ids for chunk in load.chunks] == [(SKIP_BLOCK, 9), (10, 11), (12, 13)]
    chain = KeyChain(warm.spec)
    chain.extend(PROMPT, 6)
    assert [chunk.keys for chunk in load.chunks] == [chain.chunk_keys(c) for c in range(3)]
    assert plan.saves == ()  # loaded chunks are held: never saved again


def test_a_chunk_aligned_local_prefix_loads_whole_chunks_only(warm: Rig) -> None:
    req = Req("b", PROMPT)
    assert offer(warm, req, 32) == (64, False)
    warm.scheduler.update_state_after_alloc(req, B_BLOCKS, 64)
    (load,) = warm.plan(new_step("b", B_BLOCKS, 96, 4)).loads
    assert [chunk.block_ids for chunk in load.chunks] == [(10, 11), (12, 13)]


def test_repeated_calls_are_side_effect_free(warm: Rig) -> None:
    req = Req("b", PROMPT)
    answers = [offer(warm, req) for _ in range(3)]
    assert answers == [(96, False)] * 3
    assert warm.plan(new_step("b", B_BLOCKS, 0, 100)).loads == ()  # asking plans nothing
    # vLLM may allocate for fewer tokens than offered (another version's call order): nothing is loaded.
    other = Req("c", PROMPT)
    assert offer(warm, other) == (96, False)
    warm.scheduler.update_state_after_alloc(other, B_BLOCKS, 64)
    assert warm.plan(new_step("c", B_BLOCKS, 64, 36)).loads == ()
    counters, _ = warm.scheduler.take_counters()
    assert counters["load_plan_mismatches"] == 1
    # The real thing: asked, allocated, loaded once, even if update_state_after_alloc comes twice.
    third = Req("d", PROMPT)
    assert offer(warm, third) == (96, False)
    warm.scheduler.update_state_after_alloc(third, B_BLOCKS, 96)
    warm.scheduler.update_state_after_alloc(third, B_BLOCKS, 96)
    assert len(warm.plan(new_step("d", B_BLOCKS, 96, 4)).loads) == 1
    assert warm.plan(cached_step("d", 100, 1)).loads == ()


def test_hit_is_the_minimum_across_tp_ranks() -> None:
    spec = make_spec(tp_size=2)
    workers = [embedded_worker(spec, rank)[0] for rank in range(2)]
    rig = Rig(spec, workers)
    try:
        rig.report()
        prefill(rig, Req("a", PROMPT), A_BLOCKS)
        assert offer(rig, Req("b", PROMPT)) == (96, False)
        chain = KeyChain(spec)
        chain.extend(PROMPT, 6)
        stores = [w.backend.store for w in workers if isinstance(w.backend, EmbeddedBackend)]
        assert stores[1].remove(chain.chunk_keys(2)[1])  # rank 1 lost its shard of chunk 2
        rig.report()
        assert offer(rig, Req("c", PROMPT)) == (64, False)
        assert stores[0].remove(chain.chunk_keys(0)[0])  # rank 0 lost chunk 0: nothing is loadable
        rig.report()
        assert offer(rig, Req("d", PROMPT)) == (0, False)
    finally:
        rig.close()


def test_a_rank_outside_the_tp_group_is_ignored(warm: Rig) -> None:
    warm.scheduler.apply_reports([WorkerReport(rank=5, changes=(TierChange("cleared", "host"),))])
    assert offer(warm, Req("b", PROMPT)) == (96, False)


def test_new_requests_wait_for_every_ranks_first_report_then_go_on() -> None:
    spec = make_spec(tp_size=2)
    workers = [embedded_worker(spec, rank)[0] for rank in range(2)]
    rig = Rig(spec, workers, snapshot_wait_s=0.3)
    try:
        req = Req("a", PROMPT)
        start = time.monotonic()
        assert offer(rig, req) == (None, False)  # "ask again": the catalog is not known yet
        rig.scheduler.apply_reports([workers[0].report()])
        assert offer(rig, req) == (None, False)  # rank 1 has not reported
        while offer(rig, req) == (None, False):
            time.sleep(0.02)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 5
        assert offer(rig, req) == (0, False)  # after the wait: what is known (nothing)
    finally:
        rig.close()
    rig = Rig(spec, [embedded_worker(spec, rank)[0] for rank in range(2)], snapshot_wait_s=30)
    try:
        rig.report()
        assert offer(rig, req) == (0, False)  # both reported: answered at once
    finally:
        rig.close()


def test_a_restarted_engine_knows_what_its_disk_tier_still_holds(tmp_path: Path) -> None:
    spec = make_spec()

    def engine() -> Rig:
        store = Store([DiskTier(tmp_path / "disk", 16 << 20)])
        worker = WorkerSide(spec, 0, EmbeddedBackend(store))
        worker.register_kv_caches(make_caches(spec, 24))
        return Rig(spec, [worker], snapshot_wait_s=30)

    first = engine()
    first.report()
    prefill(first, Req("a", PROMPT), A_BLOCKS)
    assert offer(first, Req("b", PROMPT)) == (96, False)
    first.close()
    second = engine()
    try:
        assert offer(second, Req("b", PROMPT)) == (None, False)
        second.report()  # the snapshot lists the disk tier's chunks
        assert offer(second, Req("b", PROMPT)) == (96, False)
        assert second.scheduler.hit_sources(Req("b", PROMPT), 96) == {"disk": 96}
    finally:
        second.close()


def test_a_snapshot_replaces_what_the_scheduler_knew_of_that_rank(warm: Rig) -> None:
    warm.scheduler.apply_reports([WorkerReport(rank=0, snapshot=True)])  # a worker restarted empty
    assert offer(warm, Req("b", PROMPT)) == (0, False)


def test_saves_only_full_chunks_once_each(rig: Rig) -> None:
    req = Req("a", PROMPT)
    assert offer(rig, req) == (0, False)
    rig.scheduler.update_state_after_alloc(req, A_BLOCKS, 0)
    # Chunked prefill: 40 tokens (chunk 0 complete), then 60 (chunks 1 and 2; 4 tokens of chunk 3).
    first = rig.step(new_step("a", A_BLOCKS, 0, 40))
    assert [s.block_ids for s in first.saves] == [(0, 1)]
    assert first.saves[0].num_tokens == CHUNK
    second = rig.step(cached_step("a", 40, 60))
    assert [s.block_ids for s in second.saves] == [(2, 3), (4, 5)]
    chain = KeyChain(rig.spec)
    chain.extend(PROMPT, 6)
    assert [s.keys for s in first.saves + second.saves] == [chain.chunk_keys(c) for c in range(3)]
    assert [s.block_keys for s in first.saves + second.saves] == [chain.chunk_block_keys(c) for c in range(3)]
    # Decode: chunk 3 fills at token 128 (its KV is computed in the step that runs token 127).
    req.decode(*tokens(27, start=9000))  # 127 tokens
    assert rig.step(cached_step("a", 100, 1, [7])).saves == ()
    req.decode(1)
    assert [s.block_ids for s in rig.step(cached_step("a", 127, 1)).saves] == [(6, 7)]
    # Another request with the same prompt: held chunks are not planned again.
    other = Req("b", PROMPT)
    rig.scheduler.update_state_after_alloc(other, B_BLOCKS, 0)
    assert rig.step(new_step("b", B_BLOCKS, 0, 100)).saves == ()


def test_save_decode_off_saves_the_prompt_only() -> None:
    spec = make_spec()
    rig = Rig(spec, [embedded_worker(spec)[0]], save_decode=False)
    try:
        rig.report()
        req = Req("a", PROMPT)
        prefill(rig, req, A_BLOCKS)
        req.decode(*tokens(28, start=9000))
        assert rig.step(cached_step("a", 127, 1, [7])).saves == ()
    finally:
        rig.close()


def test_load_and_save_switches() -> None:
    spec = make_spec()
    saveless = Rig(spec, [embedded_worker(spec)[0]], save=False)
    try:
        saveless.report()
        assert prefill(saveless, Req("a", PROMPT), A_BLOCKS).saves == ()
    finally:
        saveless.close()
    loadless = Rig(spec, [embedded_worker(spec)[0]], load=False)
    try:
        loadless.report()
        assert len(prefill(loadless, Req("a", PROMPT), A_BLOCKS).saves) == 3  # it still saves
        assert offer(loadless, Req("b", PROMPT)) == (0, False)
    finally:
        loadless.close()


def test_lora_and_cache_salt_isolate_and_multimodal_stays_out(rig: Rig) -> None:
    prefill(rig, Req("a", PROMPT, lora_request=LoRA("sql")), A_BLOCKS)
    assert offer(rig, Req("b", PROMPT)) == (0, False)
    assert offer(rig, Req("c", PROMPT, lora_request=LoRA("chat"))) == (0, False)
    assert offer(rig, Req("d", PROMPT, lora_request=LoRA("sql"))) == (96, False)
    assert offer(rig, Req("e", PROMPT, lora_request=LoRA("sql"), cache_salt="x")) == (0, False)
    assert offer(rig, Req("f", PROMPT, lora_request=LoRA("sql"), mm_features=[object()])) == (0, False)
    # A multimodal request is not tracked, planned or saved.
    mm = Req("g", PROMPT, mm_features=[object()])
    rig.scheduler.update_state_after_alloc(mm, B_BLOCKS, 0)
    assert rig.plan(new_step("g", B_BLOCKS, 0, 100)).saves == ()


def test_hit_sources_and_counters(warm: Rig) -> None:
    warm.scheduler.take_counters()
    req = Req("b", PROMPT)
    assert offer(warm, req, 16) == (80, False)
    assert warm.scheduler.hit_sources(req, 80) == {"host": 80}
    assert warm.scheduler.hit_sources(req, 0) == {}
    assert warm.scheduler.hit_sources(Req("unknown", PROMPT), 80) == {}
    warm.scheduler.update_state_after_alloc(req, B_BLOCKS, 80)
    warm.step(new_step("b", B_BLOCKS, 96, 4))
    counters, latencies = warm.scheduler.take_counters()
    assert counters["hit_tokens"] == 80
    assert counters["queried_tokens"] == 100
    assert counters["loaded_chunks"] == 3  # the worker's counters ride on its report
    assert latencies == []  # embedded lookups are dict probes, not timed
    assert warm.scheduler.take_counters() == ({}, [])


def test_events_are_rank_zero_changes_with_block_keys(rig: Rig) -> None:
    assert rig.scheduler.take_events() == []  # the snapshot is not an event
    prefill(rig, Req("a", PROMPT), A_BLOCKS)
    events = rig.scheduler.take_events()
    chain = KeyChain(rig.spec)
    chain.extend(PROMPT, 6)
    assert [(e.kind, e.tier) for e in events] == [("stored", "host")] * 3
    assert [e.keys for e in events] == [(chain.chunk_keys(c)[0],) for c in range(3)]
    assert [e.block_keys for e in events] == [chain.chunk_block_keys(c)[0] for c in range(3)]
    assert rig.scheduler.take_events() == []


def test_finished_requests_are_forgotten_and_forwarded(warm: Rig) -> None:
    req = Req("b", PROMPT)
    offer(warm, req)
    warm.scheduler.request_finished(req)
    warm.scheduler.request_finished(req)  # idempotent
    out = new_step("x", [], 0, 0)
    out.finished_req_ids = {"b"}
    assert warm.plan(out).finished == ("b",)
    assert warm.scheduler.hit_sources(req, 96) == {}


def test_a_resumed_request_saves_from_its_new_blocks(rig: Rig) -> None:
    req = Req("a", PROMPT)
    offer(rig, req)
    rig.scheduler.update_state_after_alloc(req, A_BLOCKS, 0)
    assert [s.block_ids for s in rig.step(new_step("a", A_BLOCKS, 0, 40)).saves] == [(0, 1)]
    # Preempted, then resumed into other blocks: vLLM recomputes from 0 (its own prefix cache aside).
    moved = [16, 17, 18, 19, 20, 21, 22]
    plan = rig.step(cached_step("a", 0, 100, moved, resumed=True))
    assert [s.block_ids for s in plan.saves] == [(18, 19), (20, 21)]


def test_chunks_evicted_between_two_asks_are_saved_when_computed(warm: Rig) -> None:
    req = Req("b", PROMPT)
    assert offer(warm, req) == (96, False)  # vLLM asks; the allocation fails, the request waits
    store = warm.workers[0].backend.store  # type: ignore[attr-defined]
    chain = KeyChain(warm.spec)
    chain.extend(PROMPT, 6)
    for c in range(3):
        assert store.remove(chain.chunk_keys(c)[0])  # evicted meanwhile
    warm.report()
    assert offer(warm, req) == (0, False)  # asked again: nothing held now
    warm.scheduler.update_state_after_alloc(req, B_BLOCKS, 0)
    plan = warm.step(new_step("b", B_BLOCKS, 0, 100))
    assert [s.block_ids for s in plan.saves] == [(8, 9), (10, 11), (12, 13)]


def test_blocks_and_chunks_of_the_helpers() -> None:
    """The constants the tests above rely on."""
    assert CHUNK == 2 * BLOCK == make_spec().chunk_tokens
    assert len(A_BLOCKS) == len(B_BLOCKS) == -(-len(PROMPT) // BLOCK)


def test_chunks_saved_in_the_first_step_reach_the_event_stream() -> None:
    spec = make_spec()
    rig = Rig(spec, [embedded_worker(spec)[0]], snapshot_wait_s=0)
    try:
        prefill(rig, Req("a", PROMPT), A_BLOCKS)  # the engine's first step: its report is the first
        assert offer(rig, Req("b", PROMPT)) == (96, False)  # the catalog has them (from the snapshot)
        events = rig.scheduler.take_events()
        assert {(e.kind, e.tier) for e in events} == {("stored", "host")}
        chain = KeyChain(spec)
        chain.extend(PROMPT, 6)
        assert sorted(k for e in events for k in e.keys) == sorted(chain.chunk_keys(c)[0] for c in range(3))
        assert sorted(b for e in events for b in e.block_keys) == sorted(
            b for c in range(3) for b in chain.chunk_block_keys(c)[0]
        )
    finally:
        rig.close()


def test_per_tier_hit_counters_add_up_to_the_hit(warm: Rig) -> None:
    warm.scheduler.take_counters()
    req = Req("b", PROMPT)
    assert offer(warm, req, 64) == (32, False)  # vLLM holds two chunks itself; kvstrata adds the third
    assert warm.scheduler.hit_sources(req, 32) == {"host": 32}
    warm.scheduler.update_state_after_alloc(req, B_BLOCKS, 32)
    counters, _ = warm.scheduler.take_counters()
    assert counters["hit_tokens"] == 32
    assert counters["hit_tokens_host"] == 32
