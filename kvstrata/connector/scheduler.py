"""The scheduler half: how many tokens kvstrata can supply, and what each step loads and saves.

It runs in vLLM's scheduler (EngineCore) process, which is not the workers' process with the mp executor
(always so with TP > 1), so it never touches the KV itself. It knows what kvstrata holds in two ways:

- **embedded** (a Store inside each worker): from the workers' reports (:class:`WorkerReport`, through
  vLLM's per-step worker metadata): a catalog per rank, seeded by a full snapshot on each worker's first
  report (what a restarted engine's disk tier still holds). A lookup is then a few dict probes, no I/O.
  Until every rank has reported (one engine step), a new request is answered ``None`` ("ask again"),
  ``snapshot_wait_s`` at most.
- **servers**: an asynchronous ``lookup_prefix`` per rank on a small thread pool, with a deadline
  (``lookup_timeout_s``): ``None`` while pending (after waiting ``lookup_wait_s``, enough for a loopback
  round trip), a miss past the deadline or on any error. Loads from servers are asynchronous.

A hit counts a chunk only if every rank holds it, ends on a chunk boundary (so on a block boundary), and
leaves at least one prompt token to compute. ``get_num_new_matched_tokens`` has no side effect but the
per-request caches of keys and lookups (vLLM may call it again, e.g. after a failed allocation).

Saving: each step, every full chunk that this step's forward pass completes is planned for saving (the
prompt's and, with ``save_decode``, the ones decode fills), unless kvstrata already holds it or the request
loaded it. The workers gather it in ``wait_for_save``; a failed save is a future miss, never an error.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstrata.connector.metadata import ChunkLoad, ChunkSave, LoadSpec, StepPlan, TierChange, WorkerReport
from kvstrata.connector.spec import EngineSpec, KeyChain
from kvstrata.core.chunk import PrefixResult
from kvstrata.core.keys import ExtraKey
from kvstrata.kernels.paged import SKIP_BLOCK

__all__ = ["LookupFn", "SchedulerSide", "request_extra_keys"]

log = logging.getLogger(__name__)

#: ``lookup(keys) -> PrefixResult`` on the servers (one rank's chunk keys); raises on failure.
LookupFn = Callable[[Sequence[bytes]], PrefixResult]

#: Keys saved recently through servers, remembered to not save them again (bounded).
_RECENT_SAVES = 200_000


def request_extra_keys(request: Any) -> tuple[ExtraKey, ...] | None:
    """The extra keys that make a request's KV differ from another's with the same tokens (LoRA, cache
    salt), or ``None`` when kvstrata must stay out of it (multimodal inputs, prompt embeddings: the token
    ids do not determine the KV)."""
    if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
        return None
    extras: list[ExtraKey] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        extras.append("lora:" + str(getattr(lora, "lora_name", "") or getattr(lora, "name", "")))
    salt = getattr(request, "cache_salt", None)
    if salt:
        extras.append("salt:" + str(salt))
    return tuple(extras)


@dataclass
class _Lookup:
    future: concurrent.futures.Future[tuple[int, tuple[str, ...]]]
    started: float
    num_chunks: int
    result: tuple[int, tuple[str, ...]] | None = None


@dataclass
class _Req:
    request: Any
    chain: KeyChain
    block_ids: list[int] = field(default_factory=list)
    #: leading chunks known held (loaded, found, or saved): never saved again
    held_chunks: int = 0
    #: the chunks below this index were planned for saving or are held
    next_save: int = 0
    #: what get_num_new_matched_tokens last offered: (local tokens, external tokens, tiers of the chunks)
    offer: tuple[int, int, tuple[str, ...]] = (0, 0, ())
    load_planned: bool = False
    #: the planned load's chunks, from chunk ``load_start`` on (to find the chunk a load error hit)
    load: tuple[ChunkLoad, ...] = ()
    load_start: int = 0
    #: a load of this request failed: it computes from there, and is never offered a load again
    load_failed: bool = False
    lookup: _Lookup | None = None


class SchedulerSide:
    """The scheduler half; ``lookup`` is given when the KV lives on servers (else: embedded)."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        load: bool = True,
        save: bool = True,
        save_decode: bool = True,
        lookup: LookupFn | None = None,
        lookup_timeout_s: float = 0.5,
        lookup_wait_s: float = 0.002,
        snapshot_wait_s: float = 5.0,
    ) -> None:
        self.spec = spec
        self._load = load
        self._save = save
        self._save_decode = save_decode
        self._lookup_fn = lookup
        self._lookup_timeout = lookup_timeout_s
        self._lookup_wait = lookup_wait_s
        self._snapshot_wait = snapshot_wait_s
        self._reqs: dict[str, _Req] = {}
        #: embedded: per rank, chunk key -> the tiers holding it (bits of _TIER_BITS)
        self._catalog: list[dict[bytes, int]] = [{} for _ in range(spec.tp_size)]
        self._snapshots: set[int] = set()
        self._first_ask: float | None = None
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._loads: list[LoadSpec] = []
        self._saves: list[ChunkSave] = []
        self._events: list[TierChange] = []
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstrata-lookup")
            if lookup is not None
            else None
        )
        self._lock = threading.Lock()  # guards the counters (read by the stats of another thread)
        self.counters: dict[str, float] = {}
        self.lookup_latencies_s: list[float] = []

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        """Whether the KV lives on servers (asynchronous lookups and loads)."""
        return self._lookup_fn is not None

    def _count(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + value

    def take_counters(self) -> tuple[dict[str, float], list[float]]:
        """The counters and lookup latencies since the last call (for vLLM's stats)."""
        with self._lock:
            counters, self.counters = self.counters, {}
            latencies, self.lookup_latencies_s = self.lookup_latencies_s, []
        return counters, latencies

    def _track(self, request: Any) -> _Req | None:
        req = self._reqs.get(request.request_id)
        if req is None:
            extras = request_extra_keys(request)
            if extras is None:
                return None
            req = _Req(request, KeyChain(self.spec, extras))
            self._reqs[request.request_id] = req
        return req

    def _held_embedded(self, req: _Req, num_chunks: int) -> tuple[int, tuple[str, ...]]:
        tiers: list[str] = []
        for chunk in range(num_chunks):
            keys = req.chain.chunk_keys(chunk)
            found = [self._catalog[rank].get(key, 0) for rank, key in enumerate(keys)]
            if not all(found):
                break
            tiers.append(_top_tier(found[0]))
        return len(tiers), tuple(tiers)

    def _remote_lookup(self, keys_by_rank: list[list[bytes]]) -> tuple[int, tuple[str, ...]]:
        assert self._lookup_fn is not None
        start = time.perf_counter()
        best: PrefixResult | None = None
        for keys in keys_by_rank:
            found = self._lookup_fn(keys)
            if best is None or found.num_chunks < best.num_chunks:
                best = found
            if best.num_chunks == 0:
                break
        with self._lock:
            self.lookup_latencies_s.append(time.perf_counter() - start)
        assert best is not None
        return best.num_chunks, tuple(best.tiers[: best.num_chunks])

    def _held_remote(self, req: _Req, num_chunks: int) -> tuple[int, tuple[str, ...]] | None:
        lookup = req.lookup
        if lookup is None or (lookup.num_chunks < num_chunks and lookup.result is not None):
            bpc = self.spec.blocks_per_chunk
            keys = [[keys[(c + 1) * bpc - 1] for c in range(num_chunks)] for keys in req.chain.keys]
            assert self._pool is not None
            lookup = _Lookup(self._pool.submit(self._remote_lookup, keys), time.monotonic(), num_chunks)
            req.lookup = lookup
            self._count("lookups")
        if lookup.result is None:
            try:
                lookup.result = lookup.future.result(timeout=self._lookup_wait)
                self._servers_answered(req, lookup.num_chunks, lookup.result[0])
            except concurrent.futures.TimeoutError:
                if time.monotonic() - lookup.started < self._lookup_timeout:
                    return None  # ask again next step
                lookup.future.cancel()
                log.warning("kvstrata: a lookup took over %.3f s; the request computes", self._lookup_timeout)
                self._count("lookup_timeouts")
                lookup.result = (0, ())
            except Exception as exc:  # a dead or confused server is a miss, never a failed request
                log.warning("kvstrata: lookup failed (%s); the request computes", exc)
                self._count("lookup_errors")
                lookup.result = (0, ())
        count, tiers = lookup.result
        return min(count, num_chunks), tiers[: min(count, num_chunks)]

    def _servers_answered(self, req: _Req, asked: int, found: int) -> None:
        """Once per lookup answer: what the servers hold now is what a save may skip; what they lack must
        be saved again, even if this engine pushed it before (a failed push, a restarted server)."""
        for c in range(asked):
            keys = req.chain.chunk_keys(c)
            if c < found:
                self._remember(keys)
            else:
                for key in keys:
                    self._recent.pop(key, None)

    # -- vLLM's scheduler hooks ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """(tokens kvstrata adds beyond ``num_computed_tokens``, whether they load asynchronously)."""
        if not self._load:
            return 0, False
        chunk = self.spec.chunk_tokens
        max_chunks = (request.num_tokens - 1) // chunk  # leave one token to compute
        if max_chunks * chunk <= num_computed_tokens:
            return 0, False
        req = self._track(request)
        if req is None or req.load_failed:
            # After a failed asynchronous load that left nothing valid, vLLM frees the blocks and asks
            # again: offering the same chunks would fail the same way, over and over.
            return 0, False
        if req.load_planned:
            # Asked again after a load was planned: vLLM preempted the request (its blocks, with what
            # was loaded, are gone). Whatever is offered now needs a load of its own, into the new blocks:
            # without one, vLLM would wait forever for an asynchronous load, or compute on blocks that
            # a synchronous one never filled.
            req.load_planned = False
            req.load = ()
        keyed = req.chain.extend(request.all_token_ids, max_chunks * self.spec.blocks_per_chunk)
        max_chunks = min(max_chunks, keyed // self.spec.blocks_per_chunk)
        if self.remote:
            held = self._held_remote(req, max_chunks)
            if held is None:
                return None, False
        else:
            if len(self._snapshots) < self.spec.tp_size:
                now = time.monotonic()
                self._first_ask = self._first_ask or now
                if now - self._first_ask < self._snapshot_wait:
                    return None, False
            held = self._held_embedded(req, max_chunks)
        num_chunks, tiers = held
        # (No held_chunks here: an offer is not a load, and the chunks may be gone by the time the request
        # runs. Saves skip what the catalog or the servers hold when they are planned.)
        external = num_chunks * chunk - num_computed_tokens
        self._count("queried_tokens", request.num_tokens)
        if external <= 0:
            req.offer = (num_computed_tokens, 0, ())
            return 0, False
        req.offer = (num_computed_tokens, external, tiers)
        return external, self.remote

    def update_state_after_alloc(
        self, request: Any, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Record the request's blocks; plan its load when kvstrata supplies tokens."""
        req = self._track(request)
        if req is None:
            return
        req.request = request
        req.block_ids = list(block_ids)
        local, offered, tiers = req.offer
        if num_external_tokens <= 0 or req.load_planned:
            return
        if num_external_tokens != offered or local % self.spec.block_size:
            # Not what was offered (another version's call order): load nothing rather than guess.
            log.warning(
                "kvstrata: %s was offered %d tokens after %d, allocated for %d; not loading",
                request.request_id,
                offered,
                local,
                num_external_tokens,
            )
            self._count("load_plan_mismatches")
            return
        bs, bpc, chunk = self.spec.block_size, self.spec.blocks_per_chunk, self.spec.chunk_tokens
        first_block = local // bs
        end_chunk = (local + offered) // chunk
        loads: list[ChunkLoad] = []
        for c in range(local // chunk, end_chunk):
            ids = tuple(
                SKIP_BLOCK if b < first_block else req.block_ids[b] for b in range(c * bpc, (c + 1) * bpc)
            )
            loads.append(ChunkLoad(req.chain.chunk_keys(c), ids))
        req.load_planned = True
        req.load, req.load_start = tuple(loads), local // chunk
        req.held_chunks = max(req.held_chunks, end_chunk)
        req.next_save = max(req.next_save, end_chunk)
        self._loads.append(LoadSpec(request.request_id, tuple(loads), self.remote))
        self._count("hit_tokens", offered)
        for tier, tokens in self._split_by_tier(local, tiers).items():
            self._count(f"hit_tokens_{tier}", tokens)

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """``num_external_tokens`` split by the tier that supplies them (tier name -> tokens)."""
        req = self._reqs.get(request.request_id)
        if req is None or num_external_tokens <= 0:
            return {}
        local, _, tiers = req.offer
        out = self._split_by_tier(local, tiers)
        if sum(out.values()) != num_external_tokens:
            return {}
        return out

    def _split_by_tier(self, local: int, tiers: Sequence[str]) -> dict[str, int]:
        """The tokens after ``local`` (vLLM's own hit) of the offered chunks, by the tier holding each."""
        chunk = self.spec.chunk_tokens
        out: dict[str, int] = {}
        for c, tier in enumerate(tiers):
            lo = max(c * chunk, local)
            if lo < (c + 1) * chunk:
                out[tier] = out.get(tier, 0) + (c + 1) * chunk - lo
        return out

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        """The step's plan: the loads planned since the last step, the chunks this step completes."""
        scheduled: dict[str, int] = dict(getattr(scheduler_output, "num_scheduled_tokens", {}) or {})
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            req = self._reqs.get(new.req_id)
            if req is not None:
                req.block_ids = list(new.block_ids[0]) if new.block_ids else []
                self._plan_saves(req, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
            for i, req_id in enumerate(cached.req_ids):
                req = self._reqs.get(req_id)
                if req is None:
                    continue
                new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
                if req_id in resumed:
                    req.block_ids = list(new_ids[0]) if new_ids else []
                elif new_ids:
                    req.block_ids.extend(new_ids[0])
                self._plan_saves(req, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        finished = tuple(getattr(scheduler_output, "finished_req_ids", ()) or ())
        plan = StepPlan(loads=tuple(self._loads), saves=tuple(self._saves), finished=finished)
        self._loads, self._saves = [], []
        return plan

    def _plan_saves(self, req: _Req, computed: int) -> None:
        if not self._save:
            return
        tokens = req.request.all_token_ids
        if not self._save_decode:
            computed = min(computed, len(req.request.prompt_token_ids or ()))
        chunk, bpc = self.spec.chunk_tokens, self.spec.blocks_per_chunk
        end_chunk = min(computed, len(tokens)) // chunk
        if end_chunk <= req.next_save:
            return
        keyed = req.chain.extend(tokens, end_chunk * bpc)
        end_chunk = min(end_chunk, keyed // bpc, len(req.block_ids) // bpc)
        for c in range(max(req.next_save, req.held_chunks), end_chunk):
            keys = req.chain.chunk_keys(c)
            if self._known(keys):
                continue
            ids = tuple(req.block_ids[c * bpc : (c + 1) * bpc])
            self._saves.append(
                ChunkSave(req.request.request_id, keys, req.chain.chunk_block_keys(c), ids, chunk)
            )
            self._remember(keys)
            self._count("saves_planned")
        req.next_save = max(req.next_save, end_chunk)

    def _known(self, keys: tuple[bytes, ...]) -> bool:
        if self.remote:
            return all(key in self._recent for key in keys)
        return all(key in self._catalog[rank] for rank, key in enumerate(keys))

    def _remember(self, keys: tuple[bytes, ...]) -> None:
        if not self.remote:
            return  # the workers' reports say what was stored
        for key in keys:
            self._recent[key] = None
            self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_SAVES:
            self._recent.popitem(last=False)

    def load_failed(self, block_ids: Iterable[int]) -> None:
        """vLLM's ``invalid_block_ids``: the blocks whose load failed (reported by the workers, no later
        than the step that finishes the load). The requests that planned those loads compute from the
        first failed chunk on, and save what they compute again."""
        bad = set(block_ids)
        if not bad:
            return
        for req in self._reqs.values():
            if not req.load_planned or req.load_failed:
                continue
            for i, load in enumerate(req.load):
                if bad.isdisjoint(load.block_ids):
                    continue
                # A live request's loaded blocks are its own, so these errors are this load's.
                first = req.load_start + i
                for failed in req.load[i:]:  # what the servers were thought to hold: save it anew
                    for key in failed.keys:
                        self._recent.pop(key, None)
                req.load_failed = True
                req.held_chunks = min(req.held_chunks, first)
                req.next_save = min(req.next_save, first)
                self._count("failed_loads")
                break

    def request_finished(self, request: Any) -> None:
        """Forget the request (and cancel its pending lookup)."""
        req = self._reqs.pop(request.request_id, None)
        if req is not None and req.lookup is not None and req.lookup.result is None:
            req.lookup.future.cancel()

    def apply_reports(self, reports: Iterable[WorkerReport]) -> None:
        """Fold the workers' reports into the catalog; queue their changes as events."""
        for report in reports:
            if not 0 <= report.rank < self.spec.tp_size:
                continue
            catalog = self._catalog[report.rank]
            if report.snapshot:
                catalog.clear()
                self._snapshots.add(report.rank)
            for change in report.changes:
                bit = _TIER_BITS.get(change.tier, _OTHER_TIER)
                if change.kind == "stored":
                    for key in change.keys:
                        catalog[key] = catalog.get(key, 0) | bit
                elif change.kind == "removed":
                    for key in change.keys:
                        left = catalog.get(key, 0) & ~bit
                        if left:
                            catalog[key] = left
                        else:
                            catalog.pop(key, None)
                else:
                    for key in [k for k, bits in catalog.items() if bits & bit]:
                        left = catalog[key] & ~bit
                        if left:
                            catalog[key] = left
                        else:
                            del catalog[key]
                if report.rank == 0 and (change.keys or change.kind == "cleared"):
                    # A snapshot's changes too: what a restarted engine's disk tier holds is news to the
                    # KV-event stream and the index.
                    self._events.append(change)
            with self._lock:
                for name, value in report.counters.items():
                    self.counters[name] = self.counters.get(name, 0) + value

    def take_events(self) -> list[TierChange]:
        """The tier changes of rank 0 since the last call (for vLLM's KV-event stream and the index)."""
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Stop the lookup threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


#: a catalog entry is the set of tiers holding the chunk, as bits; the lowest bit set is the highest tier
_TIER_BITS = {"device": 1, "host": 2, "disk": 4, "remote": 8}
_OTHER_TIER = 16


def _top_tier(bits: int) -> str:
    lowest = bits & -bits
    return next((name for name, bit in _TIER_BITS.items() if bit == lowest), "other")
