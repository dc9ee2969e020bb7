"""Prometheus counters of the tiers: hits, misses, bytes, evictions, errors, labelled by tier.

All tiers in a process share one set of metric families (Prometheus forbids registering a family twice);
each tier also keeps its own plain counters in :class:`kvstrata.kvstore.tier.TierStats`.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter

__all__ = ["TIER_METRICS", "TierMetrics"]

_COUNTED = ("hits", "misses", "puts", "bytes_written", "bytes_read", "evictions", "errors")


class _TierCounters:
    __slots__ = ("_children",)

    def __init__(self, children: dict[str, Counter]) -> None:
        self._children = children

    def inc(self, what: str, amount: int = 1) -> None:
        child = self._children.get(what)
        if child is not None:
            child.inc(amount)


class TierMetrics:
    """The process-wide counter families; ``for_tier(name)`` gives the labelled children."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families = {
            what: Counter(f"kvstrata_tier_{what}", f"Tier {what.replace('_', ' ')}", ["tier"])
            for what in _COUNTED
        }
        self._cache: dict[str, _TierCounters] = {}

    def for_tier(self, tier: str) -> _TierCounters:
        with self._lock:
            counters = self._cache.get(tier)
            if counters is None:
                counters = _TierCounters({w: f.labels(tier=tier) for w, f in self._families.items()})
                self._cache[tier] = counters
            return counters


TIER_METRICS = TierMetrics()
