"""Prometheus counters of the tiers: hits, misses, bytes, evictions, errors, labelled by tier.

The tiers count in their own plain :class:`kvstrata.kvstore.tier.TierStats` (an attribute increment under
the lock they already hold); this module exports those counters to Prometheus at scrape time, through a
custom collector, instead of bumping a Prometheus counter (its own lock and several calls) on every chunk.
A family sums every live tier of a name plus the counts of the tiers of that name already gone, so each
stays monotonic.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["COUNTED", "TIER_METRICS", "TierMetrics"]

#: The TierStats fields exported as ``kvstrata_tier_<field>_total``.
COUNTED = ("hits", "misses", "puts", "bytes_written", "bytes_read", "evictions", "errors")


class TierMetrics(Collector):
    """The process-wide collector of every tier's counters (registered once, at import)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, tuple[str, Any]] = {}  # id(tier) -> (name, its TierStats)
        self._retired: dict[str, dict[str, int]] = {}

    def track(self, tier: object, name: str, stats: Any) -> None:
        """Export ``stats`` under the label ``tier=name`` for as long as ``tier`` lives (and after, folded
        into the retired totals)."""
        ident = id(tier)
        with self._lock:
            self._live[ident] = (name, stats)
        weakref.finalize(tier, self._retire, ident)

    def _retire(self, ident: int) -> None:
        with self._lock:
            entry = self._live.pop(ident, None)
            if entry is None:
                return
            name, stats = entry
            totals = self._retired.setdefault(name, dict.fromkeys(COUNTED, 0))
            for what in COUNTED:
                totals[what] += int(getattr(stats, what))

    def totals(self) -> dict[str, dict[str, int]]:
        """Tier name -> counter -> value (live tiers plus retired ones)."""
        with self._lock:
            out = {name: dict(values) for name, values in self._retired.items()}
            live = list(self._live.values())
        for name, stats in live:
            totals = out.setdefault(name, dict.fromkeys(COUNTED, 0))
            for what in COUNTED:
                totals[what] += int(getattr(stats, what))
        return out

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = self.totals()
        for what in COUNTED:
            doc = f"Tier {what.replace('_', ' ')}"
            family = CounterMetricFamily(f"kvstrata_tier_{what}", doc, labels=["tier"])
            for name in sorted(totals):
                family.add_metric([name], totals[name][what])
            yield family


TIER_METRICS = TierMetrics()
REGISTRY.register(TIER_METRICS)
