"""Prefix scoring: an expected time to first token (TTFT) per instance, from a lookup and the instances' load.

Pure functions, no I/O: the router calls :func:`rank_instances` with a :class:`LookupResult`, the load it
scraped from each engine, and a :class:`CostModel` (from config via :meth:`CostModel.from_config`, or from
measured bandwidths).

The estimate for one instance is ``queue + fetch + recompute``:

- *queue*: the prefill tokens already waiting on that instance at its prefill rate, plus a per-request
  overhead for the requests ahead of it (:class:`InstanceLoad`);
- *fetch*: the cached prefix is read tier by tier, each block from the fastest tier that holds it. The
  lookup gives, per tier, the depth of its consecutive run; taking tiers fastest first, tier ``t`` serves
  blocks ``[covered, depth_t)``. Blocks of the prefix beyond every tier's run (held in a mix of tiers) are
  charged at the slowest tier that holds part of the prefix. Each tier costs its latency once plus bytes
  over bandwidth; the device tier (the engine's own prefix cache) costs nothing;
- *recompute*: the tokens not fetched, at the prefill rate.

An engine loads a cached block only when that beats recomputing it, so the estimate takes the best cut:
fetch the first ``k`` cached blocks and recompute the rest, minimised over the tier boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstrata.errors import InvalidArgumentError
from kvstrata.index.base import TIERS, InstanceMatch, LookupResult

if TYPE_CHECKING:
    from kvstrata.config import IndexConfig

__all__ = [
    "CostModel",
    "InstanceLoad",
    "TTFTEstimate",
    "estimate_ttft",
    "fetch_plan",
    "rank_instances",
]

_GIB = 1024**3


@dataclass(frozen=True, slots=True)
class CostModel:
    """What time costs: prefill speed, the size of a block's KV, and each tier's bandwidth and latency."""

    #: tokens per second one instance prefills
    prefill_tokens_per_s: float
    #: tokens per block (the engine's block size)
    block_size: int
    #: bytes of KV per block (all layers, K and V)
    block_bytes: int
    #: bytes per second each tier delivers to the engine (device: the engine's own cache, free)
    tier_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    #: fixed seconds per tier used (a request's round trip to a disk or a remote server)
    tier_latency_s: Mapping[str, float] = field(default_factory=dict)
    #: seconds of scheduling overhead per request ahead in the queue
    per_request_s: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.block_size <= 0 or self.block_bytes < 0:
            raise InvalidArgumentError("prefill rate and block size must be positive, block bytes >= 0")
        for tier in (*self.tier_bytes_per_s, *self.tier_latency_s):
            if tier not in TIERS:
                raise InvalidArgumentError(f"unknown tier {tier!r} in the cost model")

    @classmethod
    def from_config(cls, config: IndexConfig, *, block_size: int, block_bytes: int) -> CostModel:
        """The cost model of the ``[index]`` config section for a model with this block size and KV size."""
        return cls(
            prefill_tokens_per_s=config.prefill_tokens_per_s,
            block_size=block_size,
            block_bytes=block_bytes,
            tier_bytes_per_s={
                "device": float("inf"),
                "host": config.host_gib_per_s * _GIB,
                "disk": config.disk_gib_per_s * _GIB,
                "remote": config.remote_gib_per_s * _GIB,
            },
        )

    def fetch_seconds(self, tier: str, blocks: int) -> float:
        """Seconds to bring ``blocks`` blocks from ``tier`` (0 for none)."""
        if blocks <= 0:
            return 0.0
        rate = self.tier_bytes_per_s.get(tier, float("inf") if tier == "device" else 0.0)
        if rate <= 0:
            return float("inf")
        return self.tier_latency_s.get(tier, 0.0) + blocks * self.block_bytes / rate

    def recompute_seconds(self, tokens: int) -> float:
        """Seconds to prefill ``tokens`` tokens."""
        return max(0, tokens) / self.prefill_tokens_per_s


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """An instance's load, as its engine reports it (vLLM: waiting/running requests, queued tokens)."""

    #: prefill tokens of requests waiting ahead
    queued_tokens: int = 0
    #: requests waiting ahead
    waiting_requests: int = 0


@dataclass(frozen=True, slots=True)
class TTFTEstimate:
    """The expected TTFT of a prompt on one instance, and its parts."""

    instance: str
    total_s: float
    queue_s: float
    fetch_s: float
    recompute_s: float
    #: blocks fetched from each tier in the best plan
    fetched_blocks: Mapping[str, int]
    #: tokens served from cache in the best plan
    cached_tokens: int


def fetch_plan(match: InstanceMatch | None) -> list[tuple[str, int]]:
    """The blocks of the cached prefix each tier serves, fastest tier first: ``[(tier, blocks), ...]``."""
    if match is None or match.blocks <= 0:
        return []
    plan: list[tuple[str, int]] = []
    covered = 0
    slowest = None
    for tier in TIERS:
        depth = min(match.tiers.get(tier, 0), match.blocks)
        if depth > 0:
            slowest = tier
        if depth > covered:
            plan.append((tier, depth - covered))
            covered = depth
    if covered < match.blocks:
        # the rest of the prefix is held in a mix of tiers: charge it at the slowest one seen
        tier = slowest or TIERS[-1]
        if plan and plan[-1][0] == tier:
            plan[-1] = (tier, plan[-1][1] + match.blocks - covered)
        else:
            plan.append((tier, match.blocks - covered))
    return plan


def estimate_ttft(
    num_tokens: int,
    match: InstanceMatch | None,
    load: InstanceLoad,
    model: CostModel,
    *,
    instance: str | None = None,
) -> TTFTEstimate:
    """The expected TTFT of a ``num_tokens``-token prompt on one instance (``match`` None: nothing cached)."""
    if num_tokens < 0:
        raise InvalidArgumentError("num_tokens must be >= 0")
    name = instance if instance is not None else (match.instance if match is not None else "")
    queue_s = model.recompute_seconds(load.queued_tokens) + load.waiting_requests * model.per_request_s
    # at least the last token is always computed (the engine needs its logits)
    max_cached_blocks = max(0, (num_tokens - 1) // model.block_size)
    best: tuple[float, float, int, dict[str, int]] = (model.recompute_seconds(num_tokens), 0.0, 0, {})
    fetch_s = 0.0
    blocks = 0
    fetched: dict[str, int] = {}
    for tier, count in fetch_plan(match):
        count = min(count, max_cached_blocks - blocks)
        if count <= 0:
            break
        fetch_s += model.fetch_seconds(tier, count)
        blocks += count
        fetched[tier] = count
        recompute_s = model.recompute_seconds(num_tokens - blocks * model.block_size)
        if fetch_s + recompute_s < best[0] + best[1]:
            best = (recompute_s, fetch_s, blocks, dict(fetched))
    recompute_s, best_fetch, best_blocks, best_fetched = best
    return TTFTEstimate(
        instance=name,
        total_s=queue_s + best_fetch + recompute_s,
        queue_s=queue_s,
        fetch_s=best_fetch,
        recompute_s=recompute_s,
        fetched_blocks=best_fetched,
        cached_tokens=best_blocks * model.block_size,
    )


def rank_instances(
    num_tokens: int,
    result: LookupResult,
    instances: Sequence[str],
    loads: Mapping[str, InstanceLoad],
    model: CostModel,
) -> list[TTFTEstimate]:
    """Estimates for every candidate instance, best (lowest TTFT) first; ties go to the name, for stability.

    Candidates absent from ``result`` have nothing cached; absent from ``loads``, no load.
    """
    estimates = [
        estimate_ttft(
            num_tokens, result.matches.get(name), loads.get(name, InstanceLoad()), model, instance=name
        )
        for name in instances
    ]
    return sorted(estimates, key=lambda e: (e.total_s, e.instance))
