"""The TTFT scoring functions, on their own."""

from __future__ import annotations

import math

import pytest

from kvstrata.config import IndexConfig
from kvstrata.errors import InvalidArgumentError
from kvstrata.index.base import InstanceMatch, LookupResult
from kvstrata.index.scoring import CostModel, InstanceLoad, estimate_ttft, fetch_plan, rank_instances

MIB = 1024**2
# 1000 tokens/s prefill, 16-token blocks of 1 MiB; host 1 GiB/s, disk 100 MiB/s with 10 ms latency
MODEL = CostModel(
    prefill_tokens_per_s=1000.0,
    block_size=16,
    block_bytes=MIB,
    tier_bytes_per_s={"device": math.inf, "host": 1024 * MIB, "disk": 100 * MIB},
    tier_latency_s={"disk": 0.01},
    per_request_s=0.05,
)


def test_fetch_plan_takes_each_block_from_the_fastest_tier() -> None:
    match = InstanceMatch("a", 10, {"device": 2, "host": 6, "disk": 10})
    assert fetch_plan(match) == [("device", 2), ("host", 4), ("disk", 4)]
    assert fetch_plan(InstanceMatch("a", 10, {"host": 3})) == [("host", 10)]  # the rest: a mix, at host
    assert fetch_plan(InstanceMatch("a", 8, {"host": 3, "disk": 5})) == [("host", 3), ("disk", 5)]
    assert fetch_plan(None) == []


def test_nothing_cached_is_a_full_recompute_plus_queue() -> None:
    est = estimate_ttft(320, None, InstanceLoad(queued_tokens=500, waiting_requests=2), MODEL, instance="x")
    assert est.recompute_s == pytest.approx(0.32)
    assert est.queue_s == pytest.approx(0.5 + 0.1)
    assert est.total_s == pytest.approx(0.92)
    assert est.cached_tokens == 0 and est.fetch_s == 0


def test_cached_blocks_cost_bytes_over_bandwidth() -> None:
    match = InstanceMatch("a", 10, {"device": 4, "host": 10})
    est = estimate_ttft(320, match, InstanceLoad(), MODEL)
    assert est.fetched_blocks == {"device": 4, "host": 6}
    assert est.fetch_s == pytest.approx(6 / 1024)
    assert est.recompute_s == pytest.approx((320 - 160) / 1000)
    assert est.cached_tokens == 160


def test_a_slow_tier_is_not_used_when_recomputing_is_cheaper() -> None:
    slow = CostModel(
        prefill_tokens_per_s=100_000.0,
        block_size=16,
        block_bytes=64 * MIB,
        tier_bytes_per_s={"disk": 10 * MIB},
    )
    est = estimate_ttft(320, InstanceMatch("a", 10, {"disk": 10}), InstanceLoad(), slow)
    assert est.cached_tokens == 0
    assert est.total_s == pytest.approx(320 / 100_000)


def test_the_last_token_is_always_computed() -> None:
    est = estimate_ttft(64, InstanceMatch("a", 4, {"device": 4}), InstanceLoad(), MODEL)
    assert est.cached_tokens == 48  # 3 of the 4 blocks: the prompt's last token needs computing
    assert est.recompute_s == pytest.approx(16 / 1000)


def test_ranking_weighs_cache_against_load() -> None:
    result = LookupResult(20, {"hot": InstanceMatch("hot", 20, {"host": 20})})
    loads = {"hot": InstanceLoad(queued_tokens=200), "idle": InstanceLoad()}
    ranked = rank_instances(320, result, ["idle", "hot"], loads, MODEL)
    assert [e.instance for e in ranked] == ["hot", "idle"]
    loads["hot"] = InstanceLoad(queued_tokens=5000)
    ranked = rank_instances(320, result, ["idle", "hot"], loads, MODEL)
    assert [e.instance for e in ranked] == ["idle", "hot"]


def test_from_config_and_validation() -> None:
    model = CostModel.from_config(IndexConfig(), block_size=16, block_bytes=MIB)
    assert model.fetch_seconds("device", 100) == 0.0
    assert model.fetch_seconds("disk", 1024) == pytest.approx(1.0)
    assert model.fetch_seconds("host", 0) == 0.0
    with pytest.raises(InvalidArgumentError):
        CostModel(prefill_tokens_per_s=0, block_size=16, block_bytes=1)
    with pytest.raises(InvalidArgumentError):
        CostModel(prefill_tokens_per_s=1, block_size=16, block_bytes=1, tier_bytes_per_s={"tape": 1.0})
