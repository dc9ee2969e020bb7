"""Feed a Store's (or a tier's) events into a :class:`BlockIndex` under one instance name.

This is how a cache server or an engine-side store makes its tiers visible in the global index: every
``stored`` event becomes ``index.add(instance, tier, block_keys)``, every ``removed`` event
``index.remove(...)``. A ``cleared`` tier needs nothing more, because :meth:`Tier.clear` reports each chunk
it drops before it reports the clear.

Call order: ``IndexFeeder(index, instance)`` -> ``attach(store)`` (clears the instance's old entries, an
O(1) epoch bump, then announces what the store already holds, e.g. a disk tier recovered at start-up)
-> events flow, and ``heartbeat()`` is called by a background thread every third of the lease TTL ->
``close()`` (stops the heartbeats and unsubscribes; the entries then expire with the lease).

Failure semantics: index entries are hints. Index errors never reach the store's threads: they are logged
(rate-limited) and counted in :attr:`errors`, and the backends themselves buffer and retry their writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from kvstrata.core.chunk import ChunkMeta
from kvstrata.index.base import BlockIndex, RateLimitedLog
from kvstrata.kvstore.tier import TierEvent, TierListener

__all__ = ["IndexFeeder"]

log = logging.getLogger(__name__)


class _Tier(Protocol):
    name: str

    def keys(self) -> Iterator[bytes]: ...


class _Source(Protocol):
    """What a feeder attaches to: a Store (or anything with its ``subscribe``, ``tiers`` and ``get_meta``)."""

    @property
    def tiers(self) -> tuple[_Tier, ...]: ...

    def subscribe(self, listener: TierListener) -> Callable[[], None]: ...

    def get_meta(self, key: bytes) -> ChunkMeta | None: ...


class IndexFeeder:
    """Keeps ``index`` in step with a store's tiers under the name ``instance``."""

    def __init__(self, index: BlockIndex, instance: str, *, heartbeat_s: float | None = None) -> None:
        self.index = index
        self.instance = instance
        self.errors = 0
        self._heartbeat_s = heartbeat_s
        self._unsubscribe: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = RateLimitedLog(log)

    def __call__(self, event: TierEvent) -> None:
        """The listener: apply one tier event to the index (never raises)."""
        try:
            if not event.block_keys:
                return
            if event.kind == "stored":
                self.index.add(self.instance, event.tier, event.block_keys)
            elif event.kind == "removed":
                self.index.remove(self.instance, event.tier, event.block_keys)
        except Exception as exc:
            self.errors += 1
            self._log.warning("index update for %s failed: %s", self.instance, exc)

    def attach(self, source: _Source) -> None:
        """Start from a clean slate for this instance, announce what ``source`` holds, follow its events."""
        try:
            self.index.clear(self.instance)
            self.index.heartbeat(self.instance)
        except Exception as exc:
            self.errors += 1
            self._log.warning("index clear for %s failed: %s", self.instance, exc)
        self._unsubscribe = source.subscribe(self)
        # Announce from the bottom tier up, so that the highest tier holding a block is added last.
        for tier in reversed(source.tiers):
            for key in tier.keys():  # noqa: SIM118 - Tier.keys() is a snapshot, tiers are not iterable
                meta = source.get_meta(key)
                if meta is not None and meta.block_keys:
                    self(TierEvent("stored", tier.name, (key,), meta.block_keys))
        if self._heartbeat_s:
            self._thread = threading.Thread(target=self._beat, name="kvstrata-index-heartbeat", daemon=True)
            self._thread.start()

    def heartbeat(self) -> None:
        """Renew this instance's lease (never raises)."""
        try:
            self.index.heartbeat(self.instance)
        except Exception as exc:
            self.errors += 1
            self._log.warning("index heartbeat for %s failed: %s", self.instance, exc)

    def _beat(self) -> None:
        assert self._heartbeat_s is not None
        while not self._stop.wait(self._heartbeat_s):
            self.heartbeat()

    def close(self) -> None:
        """Stop following the store; the instance's entries lapse with its lease."""
        self._stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
