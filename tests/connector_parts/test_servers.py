"""Both halves against real cache servers: asynchronous scheduler lookups with a deadline, worker saves pushed
in the background, asynchronous loads reported through ``get_finished``, and every server failure a miss.

The server is a real ``kvstrata serve`` process (conftest.py); a dead server is a port nobody listens on; a
server that never answers is a listening socket nobody reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvstrata.client import Client
from kvstrata.connector.metadata import StepPlan
from kvstrata.connector.scheduler import SchedulerSide
from kvstrata.connector.spec import EngineSpec, KeyChain
from kvstrata.connector.worker import WorkerSide
from kvstrata.core.chunk import PrefixResult
from tests.conftest import free_port
from tests.connector_parts.helpers import (
    Req,
    Rig,
    blocks_bytes,
    make_spec,
    new_step,
    servers_worker,
    tokens,
)
from tests.transport.servers import ServeProcess

pytestmark = pytest.mark.timeout(120)

PROMPT = tokens(100)
A_BLOCKS = list(range(0, 7))
B_BLOCKS = list(range(8, 15))


def _spec(request: pytest.FixtureRequest, **kwargs: Any) -> EngineSpec:
    """A spec whose namespace is this test's own (the session's server is shared)."""
    return make_spec(model_id=request.node.nodeid, **kwargs)


def _chain(spec: EngineSpec) -> KeyChain:
    chain = KeyChain(spec)
    chain.extend(PROMPT, 6)
    return chain


def _until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"not true after {timeout} s")


def _answer(scheduler: SchedulerSide, req: Req, timeout: float = 10.0) -> tuple[int | None, bool]:
    """Ask until the scheduler answers (vLLM asks again each step while it says ``None``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = scheduler.get_num_new_matched_tokens(req, 0)
        if got[0] is not None or time.monotonic() > deadline:
            return got
        time.sleep(0.005)


class ServerLookup:
    """What the connector gives its scheduler half: the Client's lookup, with the lookup deadline."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.client = Client([url], connect_timeout=timeout)
        self.timeout = timeout

    def __call__(self, keys: Sequence[bytes]) -> PrefixResult:
        return self.client.lookup_prefix(keys, timeout=self.timeout)


@pytest.fixture
def lookup() -> Iterator[Callable[..., ServerLookup]]:
    """Makes ServerLookups, closed at the end of the test."""
    made: list[ServerLookup] = []

    def make(url: str, timeout: float = 2.0) -> ServerLookup:
        made.append(ServerLookup(url, timeout))
        return made[-1]

    yield make
    for item in made:
        item.client.close()


def _save_plan(spec: EngineSpec, req_id: str = "a") -> StepPlan:
    """The plan of a step that runs PROMPT from A_BLOCKS: it saves three chunks (made by a scheduler half
    that knows of nothing held)."""
    planner = SchedulerSide(spec, snapshot_wait_s=0)
    try:
        req = Req(req_id, PROMPT)
        assert planner.get_num_new_matched_tokens(req, 0) == (0, False)
        planner.update_state_after_alloc(req, A_BLOCKS, 0)
        plan = planner.build_plan(new_step(req_id, A_BLOCKS, 0, 100))
    finally:
        planner.close()
    assert len(plan.saves) == 3
    return plan


def _save_prompt(workers: Sequence[WorkerSide], spec: EngineSpec) -> None:
    """Request "a" runs PROMPT; the workers gather its chunks and push them to the server."""
    plan = _save_plan(spec)
    for worker in workers:
        worker.save(plan)
        assert worker.backend.flush(10)


def _async_load(rig: Rig, req: Req, blocks: list[int], expected: int) -> set[int]:
    """Ask, allocate and load ``req`` asynchronously; returns the load errors reported with its finish."""
    got = _answer(rig.scheduler, req)
    assert got == (expected, True)
    rig.scheduler.update_state_after_alloc(req, blocks, expected)
    plan = rig.plan(new_step(req.request_id, blocks, 0, 0))  # waiting for remote KV: nothing scheduled
    (load,) = plan.loads
    assert load.asynchronous
    errors: set[int] = set()
    for worker in rig.workers:
        worker.start_load(plan)
    for worker in rig.workers:
        assert worker.take_load_errors() == set()  # an async load's errors go out with its finish
        assert _until(worker.get_finished) == {req.request_id}
        errors |= worker.take_load_errors()
    return errors


@pytest.mark.parametrize("engine_layout", ["cpu_packed", "kv_first_nhd"])
def test_save_then_asynchronous_load_through_a_server_is_bit_exact(
    request: pytest.FixtureRequest,
    kvstrata_server: ServeProcess,
    engine_layout: str,
    lookup: Callable[..., ServerLookup],
) -> None:
    spec = _spec(request, engine_layout=engine_layout)
    worker, caches = servers_worker(spec, kvstrata_server.url)
    rig = Rig(spec, [worker], lookup=lookup(kvstrata_server.url), lookup_timeout_s=5)
    try:
        report = worker.report()
        assert report.snapshot and report.changes == ()  # servers: lookups tell, no catalog
        _save_prompt([worker], spec)
        changes = worker.report().changes  # one per batch the pusher sent
        chain = _chain(spec)
        assert {(c.kind, c.tier) for c in changes} == {("stored", "remote")}
        assert tuple(k for c in changes for k in c.keys) == tuple(chain.chunk_keys(c)[0] for c in range(3))
        assert tuple(k for c in changes for k in c.block_keys) == tuple(
            k for c in range(3) for k in chain.chunk_block_keys(c)[0]
        )
        source = blocks_bytes(caches, engine_layout, A_BLOCKS[:6])
        assert blocks_bytes(caches, engine_layout, B_BLOCKS[:6]) != source
        assert _async_load(rig, Req("b", PROMPT), B_BLOCKS, 96) == set()
        assert blocks_bytes(caches, engine_layout, B_BLOCKS[:6]) == source
        counters = worker.report().counters
        assert counters["loaded_chunks"] == 3
        assert counters["loaded_bytes"] == 3 * worker.chunk_bytes
    finally:
        rig.close()


def test_a_lookup_is_none_while_pending_then_an_answer(
    request: pytest.FixtureRequest, kvstrata_server: ServeProcess, lookup: Callable[..., ServerLookup]
) -> None:
    spec = _spec(request)
    worker, _ = servers_worker(spec, kvstrata_server.url)
    _save_prompt([worker], spec)
    worker.close()
    gate = threading.Event()
    real = lookup(kvstrata_server.url)

    def slow_lookup(keys: Sequence[bytes]) -> PrefixResult:
        gate.wait(10)  # the round trip is slow today
        return real(keys)

    scheduler = SchedulerSide(spec, lookup=slow_lookup, lookup_timeout_s=10, lookup_wait_s=0.001)
    try:
        req = Req("b", PROMPT)
        assert [scheduler.get_num_new_matched_tokens(req, 0) for _ in range(3)] == [(None, False)] * 3
        gate.set()
        assert _answer(scheduler, req) == (96, True)  # an asynchronous load
        assert scheduler.get_num_new_matched_tokens(req, 0) == (96, True)  # the answer is kept
        assert scheduler.get_num_new_matched_tokens(req, 32) == (64, True)
        counters, latencies = scheduler.take_counters()
        assert counters["lookups"] == 1  # one lookup however often vLLM asks
        assert len(latencies) == 1
        assert sum(scheduler.hit_sources(req, 64).values()) == 64
    finally:
        scheduler.close()


def test_the_hit_is_the_minimum_across_tp_ranks(
    request: pytest.FixtureRequest, kvstrata_server: ServeProcess, lookup: Callable[..., ServerLookup]
) -> None:
    spec = _spec(request, tp_size=2)
    workers = [servers_worker(spec, kvstrata_server.url, rank)[0] for rank in range(2)]
    rig = Rig(spec, workers, lookup=lookup(kvstrata_server.url))
    try:
        _save_prompt(workers, spec)
        with Client([kvstrata_server.url]) as client:
            assert client.delete([_chain(spec).chunk_keys(2)[1]]) == 1  # rank 1's shard of chunk 2
        assert _answer(rig.scheduler, Req("b", PROMPT)) == (64, True)
    finally:
        rig.close()


def test_a_chunk_missing_on_the_server_fails_its_blocks_and_every_later_block(
    request: pytest.FixtureRequest, kvstrata_server: ServeProcess, lookup: Callable[..., ServerLookup]
) -> None:
    spec = _spec(request)
    worker, caches = servers_worker(spec, kvstrata_server.url)
    rig = Rig(spec, [worker], lookup=lookup(kvstrata_server.url))
    try:
        _save_prompt([worker], spec)
        req = Req("b", PROMPT)
        assert _answer(rig.scheduler, req) == (96, True)  # found, then lost before the load
        with Client([kvstrata_server.url]) as client:
            assert client.delete([_chain(spec).chunk_keys(1)[0]]) == 1
        rig.scheduler.update_state_after_alloc(req, B_BLOCKS, 96)
        plan = rig.plan(new_step("b", B_BLOCKS, 0, 0))
        worker.start_load(plan)
        assert _until(worker.get_finished) == {"b"}
        assert worker.take_load_errors() == set(B_BLOCKS[2:6])
        assert blocks_bytes(caches, "cpu_packed", B_BLOCKS[:2]) == blocks_bytes(
            caches, "cpu_packed", A_BLOCKS[:2]
        )
        assert worker.report().counters["missing_chunks"] == 1
    finally:
        rig.close()


def test_a_server_that_never_answers_is_a_miss_after_the_lookup_deadline(
    silent_server: str, lookup: Callable[..., ServerLookup]
) -> None:
    spec = make_spec()
    # The client would wait 2 s; the scheduler's own deadline (lookup_timeout_s) ends the wait first.
    scheduler = SchedulerSide(spec, lookup=lookup(silent_server, 2.0), lookup_timeout_s=0.3)
    try:
        req = Req("b", PROMPT)
        start = time.monotonic()
        assert scheduler.get_num_new_matched_tokens(req, 0) == (None, False)
        got = _answer(scheduler, req)
        waited = time.monotonic() - start
        assert got == (0, False)
        assert 0.3 <= waited < 1.9  # the scheduler's deadline, not the client's 2 s
        assert scheduler.get_num_new_matched_tokens(req, 0) == (0, False)  # no second wait
        counters, _ = scheduler.take_counters()
        assert counters["lookup_timeouts"] == 1
        assert counters["lookups"] == 1
    finally:
        scheduler.close()


def test_a_dead_server_is_a_miss_at_once(lookup: Callable[..., ServerLookup]) -> None:
    spec = make_spec()
    scheduler = SchedulerSide(spec, lookup=lookup(f"kvs://127.0.0.1:{free_port()}"), lookup_timeout_s=5)
    try:
        start = time.monotonic()
        assert _answer(scheduler, Req("b", PROMPT)) == (0, False)
        assert time.monotonic() - start < 2
        counters, _ = scheduler.take_counters()
        assert counters["lookup_errors"] == 1
    finally:
        scheduler.close()


def test_a_killed_server_turns_loads_into_errors_and_saves_into_drops(
    request: pytest.FixtureRequest, tmp_path: Path, lookup: Callable[..., ServerLookup]
) -> None:
    server = ServeProcess(tmp_path).start()
    spec = _spec(request)
    worker, _ = servers_worker(spec, server.url, load_timeout_s=1.0, connect_timeout=0.5, retry_backoff=0.05)
    rig = Rig(spec, [worker], lookup=lookup(server.url))
    try:
        _save_prompt([worker], spec)
        req = Req("b", PROMPT)
        assert _answer(rig.scheduler, req) == (96, True)
        server.kill()
        rig.scheduler.update_state_after_alloc(req, B_BLOCKS, 96)
        plan = rig.plan(new_step("b", B_BLOCKS, 0, 0))
        start = time.monotonic()
        worker.start_load(plan)
        assert _until(worker.get_finished, 5) == {"b"}
        assert time.monotonic() - start < 3  # within the load deadline, not hung
        assert worker.take_load_errors() == set(B_BLOCKS[:6])
        # Saving to a dead server never raises into the engine and never waits for the network.
        save_plan = _save_plan(spec)
        start = time.monotonic()
        worker.save(save_plan)
        assert time.monotonic() - start < 1.0
        assert worker.backend.flush(10)
        counters = worker.report().counters
        assert counters["load_errors"] >= 1
        assert counters["save_errors"] == 3
    finally:
        rig.close()
        server.kill()


def test_saves_beyond_the_pending_bound_are_dropped_not_waited_for(silent_server: str) -> None:
    spec = make_spec()
    # Room for one pending chunk; the server takes 2 s to fail the push of the first.
    worker, _ = servers_worker(spec, silent_server, max_pending_bytes=1, timeout=2.0)
    try:
        plan = _save_plan(spec)
        start = time.monotonic()
        worker.save(plan)
        assert time.monotonic() - start < 1.5
        counters = worker.backend.take_counters()
        assert counters["save_calls"] == 1
        assert counters["saves_dropped"] == 2
    finally:
        worker.close()


def test_a_chunk_gone_from_the_server_is_saved_again(
    request: pytest.FixtureRequest, kvstrata_server: ServeProcess, lookup: Callable[..., ServerLookup]
) -> None:
    spec = _spec(request)
    worker, _ = servers_worker(spec, kvstrata_server.url)
    rig = Rig(spec, [worker], lookup=lookup(kvstrata_server.url))
    try:
        first = Req("a", PROMPT)
        assert _answer(rig.scheduler, first) == (0, False)
        rig.scheduler.update_state_after_alloc(first, A_BLOCKS, 0)
        assert len(rig.step(new_step("a", A_BLOCKS, 0, 100)).saves) == 3
        assert worker.backend.flush(10)
        with Client([kvstrata_server.url]) as client:
            assert client.delete([_chain(spec).chunk_keys(c)[0] for c in range(3)]) == 3  # evicted
        again = Req("b", PROMPT)
        assert _answer(rig.scheduler, again) == (0, False)  # the lookup sees it gone
        rig.scheduler.update_state_after_alloc(again, B_BLOCKS, 0)
        assert len(rig.step(new_step("b", B_BLOCKS, 0, 100)).saves) == 3
    finally:
        rig.close()
