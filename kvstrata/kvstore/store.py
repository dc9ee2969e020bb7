"""The ``Store``: tiers stacked top (fastest) to bottom, with write-back demotion and promotion on hit.

Call order and semantics
------------------------
- ``put(key, data, meta)`` lands in the top tier that can hold the chunk. When that tier is full, its
  coldest unpinned chunks are first copied to the next tier down (write-back; recursively, so nothing is
  lost while a lower tier has room) and only then dropped. A memory tier names exactly the chunks whose
  removal places this one (``victims_for``: a chunk of the same slab class, or every chunk of one page; see
  :mod:`kvstrata.kvstore.memory`). A tier whose every chunk is pinned, which is
  too small for the chunk, or whose medium fails is passed over for the next one down; when no tier takes
  the chunk the last error is raised (:class:`TierFullError`, :class:`ChunkTooLargeError`,
  :class:`TierIOError`). Older copies of the key in the other tiers are dropped (a remote tier, shared
  and a round trip away, is left alone). With ``write_through`` the chunk is also copied to every lower
  tier in the background.
- ``get(key, out)`` searches top-down; a hit in a lower tier is promoted to the top tier (at once when the
  top tier has a free slot, else in the background). ``None`` means a miss in every tier, and only that: a
  tier whose medium fails is logged, counted and skipped.
- ``acquire(key)`` pins the chunk in the highest tier holding it (zero-copy for memory tiers) and schedules
  a promotion when that is not the top tier. A pinned chunk is never evicted or overwritten under the
  reader; always release the handle.
- ``lookup_prefix(keys)`` tells how many leading keys are present, and the highest tier of each.
- Background work (write-through copies, promotions, and demotion that keeps each tier under its
  ``high_watermark``, down to ``low_watermark``) runs on ``demotion_workers`` threads fed by one bounded
  queue. A write-through copy that finds the queue full runs on the caller's thread (back-pressure); a
  promotion or watermark demotion that finds it full is skipped. An item whose medium fails is logged
  and counted (``background_errors``, Prometheus ``kvstrata_store_background_errors_total``, and the
  failing tier's own ``errors``); the worker goes on. A lower tier that is merely full of pinned chunks
  is not an error: the copy or demotion is skipped (a put that needs the room still drops its victim,
  and counts that as an error since the chunk is lost).
- Promotion keeps the chunk in the lower tier as well (inclusive), so demoting it again costs no copy,
  and never replaces a newer value of the key stored in the top tier meanwhile.
- ``subscribe(listener)`` receives the events of every tier. ``flush()`` waits until background work is
  idle; ``close()`` flushes, stops the workers and closes the tiers.

The Store holds no lock of its own around tier calls: every tier is thread-safe, and races between
concurrent puts, evictions and readers resolve inside the tiers (a victim another thread already moved is
simply skipped).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from prometheus_client import Counter

from kvstrata.config import StoreConfig
from kvstrata.core.buffers import BufferLike, as_byte_tensor
from kvstrata.core.chunk import EMPTY_META, ChunkHandle, ChunkMeta, PrefixResult, check_key
from kvstrata.errors import (
    ChunkTooLargeError,
    InvalidArgumentError,
    StoreError,
    TierFullError,
    TierIOError,
)
from kvstrata.kvstore.background import BackgroundPool
from kvstrata.kvstore.build import tiers_from_config
from kvstrata.kvstore.memory import PooledTier
from kvstrata.kvstore.reservation import ReservingStore, StoreReservation
from kvstrata.kvstore.tier import ListenerSet, Tier, TierEvent, TierListener, TierStats

__all__ = ["Store", "StoreReservation"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Background items that failed (logged; the worker goes on), per kind of item.
BACKGROUND_ERRORS = Counter(
    "kvstrata_store_background_errors",
    "Store background items (demotion, promotion, copies) that failed",
    ["kind"],
)

#: Rounds of "demote the victims, try again" before a put gives up on a tier (other threads may race it).
_MAKE_ROOM_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class _Job:
    kind: str  # "copy_down" | "promote" | "relieve"
    key: bytes = b""
    tier: int = 0


class Store(ReservingStore):
    """Tiers stacked top (fastest) to bottom. Thread-safe. See the module docstring; the in-place writes
    (``reserve``, ``reserve_many``, ``commit_many``) are in :mod:`kvstrata.kvstore.reservation`."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        write_through: bool = False,
        demotion_queue: int = 256,
        demotion_workers: int = 1,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
    ) -> None:
        if not tiers:
            raise InvalidArgumentError("a Store needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"tier names must be unique, got {names}")
        if not 0.0 < low_watermark <= high_watermark <= 1.0:
            raise InvalidArgumentError("watermarks must satisfy 0 < low_watermark <= high_watermark <= 1")
        if demotion_queue < 1 or demotion_workers < 1:
            raise InvalidArgumentError("demotion_queue and demotion_workers must be at least 1")
        self.tiers: tuple[Tier, ...] = tuple(tiers)
        self.write_through = write_through
        self._high = high_watermark
        self._low = low_watermark
        self._by_name = {t.name: t for t in self.tiers}
        top = self.tiers[0] if self.tiers else None
        # The top tier takes reservations when it is a host-memory pool (decided once: the check reads the
        # buffer's device, microseconds per call on the put path).
        self._reservable: PooledTier | None = (
            top if isinstance(top, PooledTier) and top.buffer.device.type == "cpu" else None
        )
        self._listeners = ListenerSet("store")
        self._unsubscribe = [t.subscribe(self._forward) for t in self.tiers]
        # guards the sets below and the error count (the pool has its own lock)
        self._cond = threading.Lock()
        self._relieving: set[int] = set()  # tiers with a watermark demotion queued or running
        self._promoting: set[bytes] = set()
        self.background_errors = 0
        self._closed = False
        self._background: BackgroundPool[_Job] = BackgroundPool(
            self._run_job, queue_size=demotion_queue, workers=demotion_workers, name="kvstrata-demotion"
        )

    @classmethod
    def from_config(cls, config: StoreConfig, *, host_buffer: torch.Tensor | None = None) -> Store:
        """Build the device, host and disk tiers that ``config`` turns on, top first.

        ``host_buffer`` (optional): a caller-owned 1-D ``uint8`` CPU tensor (e.g. POSIX shared memory for
        the ``shm`` transport) to carve the host tier's pool from; its size then bounds the host tier.
        """
        return cls(
            tiers_from_config(config, host_buffer=host_buffer),
            write_through=config.write_through,
            demotion_queue=config.demotion_queue,
            demotion_workers=config.demotion_workers,
        )

    # -- lookups ---------------------------------------------------------------------------------------
    def tier(self, name: str) -> Tier | None:
        """The tier called ``name`` ("device", "host", "disk", ...), or ``None``."""
        return self._by_name.get(name)

    def contains(self, key: bytes) -> bool:
        """Whether any tier holds the chunk (not an access)."""
        key = check_key(key)
        return any(t.contains(key) for t in self.tiers)

    def lookup_prefix(self, keys: Sequence[bytes]) -> PrefixResult:
        """How many leading ``keys`` are present (stopping at the first missing one), and where."""
        found: list[str] = []
        for raw in keys:
            key = check_key(raw)
            for tier in self.tiers:
                if tier.contains(key):
                    found.append(tier.name)
                    break
            else:
                break
        return PrefixResult(len(found), tuple(found))

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """The metadata of the chunk in the highest tier holding it, or ``None``."""
        key = check_key(key)
        for tier in self.tiers:
            if tier.contains(key):
                meta = self._meta_of(tier, key)
                if meta is not None:
                    return meta
        return None

    @staticmethod
    def _meta_of(tier: Tier, key: bytes) -> ChunkMeta | None:
        try:
            return tier.get_meta(key)
        except TierIOError:
            return None

    def stats(self) -> dict[str, TierStats]:
        """Tier name -> a snapshot of its counters and occupancy."""
        return {t.name: t.snapshot() for t in self.tiers}

    # -- put ---------------------------------------------------------------------------------------------
    def put(self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META) -> None:
        """Store the chunk in the top tier that takes it (see the module docstring)."""
        key = check_key(key)
        src = as_byte_tensor(data)
        self._check_open()
        error: Exception | None = None
        landed = -1
        for index in range(len(self.tiers)):
            try:
                self._store_at(index, key, src, meta)
            except (ChunkTooLargeError, TierFullError, TierIOError) as exc:
                if isinstance(exc, TierIOError):
                    log.warning("store: put to the %s tier failed: %s", self.tiers[index].name, exc)
                error = exc
                continue
            landed = index
            break
        if landed < 0:
            assert error is not None
            raise error
        self._published(landed, key)

    def _published(self, landed: int, key: bytes) -> None:
        """After ``key`` landed in tier ``landed`` (a put or a committed reservation): drop stale copies,
        queue write-through, relieve the tier."""
        self._published_many(landed, (key,))

    def _published_many(self, landed: int, keys: Sequence[bytes]) -> None:
        """:meth:`_published` for several keys that landed in the same tier."""
        lower = range(landed + 1, len(self.tiers))
        # No other tier may keep an older value: a higher one (passed over, e.g. pinned full) would shadow
        # the new value on reads, and demotion skips the copy when a lower one already holds the key.
        # (With write-through the background copy then writes the new value down again.)
        # A remote tier is skipped: its contains() is a network round trip on every put, and it is shared
        # between instances, whose puts of a key (a digest of the tokens and the layout) are the same KV.
        for index, tier in enumerate(self.tiers):
            if index != landed and not tier.shared:
                for key in keys:
                    if tier.contains(key):
                        tier.remove(key)
        if self.write_through and lower:
            for key in keys:
                self._submit(_Job("copy_down", key, landed), run_if_full=True)
        self._maybe_relieve(landed)

    def _store_at(
        self, index: int, key: bytes, src: torch.Tensor, meta: ChunkMeta, *, promotion: bool = False
    ) -> None:
        """Put into tier ``index``, demoting its victims one tier down first when it is full.

        A ``promotion`` keeps a value of ``key`` already in the tier (it may be newer than ``src``).
        """
        tier = self.tiers[index]

        def put(evict: bool) -> None:
            if promotion:
                tier.put_if_absent(key, src, meta, evict=evict)
            else:
                tier.put(key, src, meta, evict=evict)

        self._with_room(index, src.numel(), put)

    def _with_room(self, index: int, nbytes: int, place: Callable[[bool], _T]) -> _T:
        """``place(evict)`` a ``nbytes`` chunk in tier ``index`` (a put or a reservation), demoting the
        tier's victims one tier down first when it is full; raises what ``place(True)`` raises."""
        tier = self.tiers[index]
        if index == len(self.tiers) - 1:
            return place(True)  # the bottom tier drops its coldest chunks itself
        for _ in range(_MAKE_ROOM_ROUNDS):
            try:
                return place(False)
            except TierFullError:
                pass
            victims = tier.victims_for(nbytes)
            if not victims:
                if tier.fits(nbytes):
                    continue  # another thread made room meanwhile
                raise TierFullError(f"the {tier.name} tier is full and every chunk in it is pinned")
            for victim in victims:
                self._demote(index, victim, must_free=True)
        return place(True)

    def _demote(self, index: int, key: bytes, *, must_free: bool) -> bool:
        """Copy ``key`` from tier ``index`` to the highest lower tier that takes it, then drop it there.

        When no lower tier takes it, the chunk is dropped anyway if ``must_free`` (a put needs the room;
        the failure is logged and counted), else kept and the error raised.
        """
        source = self.tiers[index]
        handle = source.pin(key)
        if handle is None:
            return False  # another thread moved or removed it already
        copied = index + 1 >= len(self.tiers)
        failure: Exception | None = None
        with handle:
            for lower in range(index + 1, len(self.tiers)):
                if self.tiers[lower].contains(key):
                    copied = True  # a copy made by write-through or an earlier demotion; never stale
                    break
                try:
                    self._store_at(lower, key, handle.data, handle.meta)
                except (ChunkTooLargeError, TierFullError, TierIOError) as exc:
                    failure = exc
                    continue
                copied = True
                break
        if not copied:
            assert failure is not None
            if not must_free:
                raise failure
            log.warning(
                "store: demoting a chunk out of the %s tier failed, dropping it: %s", source.name, failure
            )
            self._count_error("demote")
        if source.remove(key):
            source._count("evictions")  # a demotion is an eviction from this tier
        return True

    # -- get ---------------------------------------------------------------------------------------------
    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """The chunk's bytes from the highest tier holding it (into ``out`` when given), or ``None``."""
        key = check_key(key)
        self._check_open()
        for index, tier in enumerate(self.tiers):
            try:
                result = tier.get(key, out)
            except TierIOError as exc:
                log.warning("store: read from the %s tier failed: %s", tier.name, exc)
                continue
            if result is None:
                continue
            if index > 0:
                self._promote_now(key, result, index)
            return result
        return None

    def acquire(self, key: bytes) -> ChunkHandle | None:
        """Pin the chunk in the highest tier holding it; ``None`` on a miss. Release the handle."""
        key = check_key(key)
        self._check_open()
        return self._acquire_below(key, 0)

    def acquire_many(self, keys: Sequence[bytes], max_bytes: int | None = None) -> list[ChunkHandle | None]:
        """:meth:`acquire` of several keys (the top tier's hits pinned under one lock), for a prefix of
        ``keys``: with ``max_bytes``, it stops before a hit that would take the pinned bytes over it once
        there is at least one; the caller asks again for the keys after the returned ones. Release every
        handle."""
        self._check_open()
        limit = sys.maxsize if max_bytes is None else max_bytes
        top = self.tiers[0]
        start = 1  # the top tier's misses are looked for from the next tier down
        try:
            found: list[ChunkHandle | None] = top.acquire_many(keys, limit)
            first = [check_key(k) for k in keys[: len(found)]]
        except TierIOError as exc:
            log.warning("store: read from the %s tier failed: %s", top.name, exc)
            first = [check_key(k) for k in keys]
            found, start = [None] * len(first), 0
        out: list[ChunkHandle | None] = []
        total = 0
        try:
            for index, (key, handle) in enumerate(zip(first, found, strict=True)):
                if handle is None:
                    handle = self._acquire_below(key, start)
                if handle is not None:
                    size = handle.data.numel()
                    if total and total + size > limit:
                        handle.release()  # over the budget: this one and the rest are asked for again
                        for rest in found[index + 1 :]:
                            if rest is not None:
                                rest.release()
                        break
                    total += size
                out.append(handle)
        except BaseException:
            for handle in [*out, *found[len(out) :]]:
                if handle is not None:
                    handle.release()
            raise
        return out

    def _acquire_below(self, key: bytes, start: int) -> ChunkHandle | None:
        """:meth:`acquire` from tier ``start`` down (a hit below the top queues its promotion)."""
        for index in range(start, len(self.tiers)):
            tier = self.tiers[index]
            try:
                handle = tier.acquire(key)
            except TierIOError as exc:
                log.warning("store: read from the %s tier failed: %s", tier.name, exc)
                continue
            if handle is None:
                continue
            if index > 0:
                self._submit_promotion(key)
            return handle
        return None

    def _promote_now(self, key: bytes, data: torch.Tensor, found: int) -> None:
        top = self.tiers[0]
        if not self.tiers[found].catalog_meta:
            # Its metadata (block keys, for the events) would cost a second read: let a worker do it.
            self._submit_promotion(key)
            return
        if top.contains(key):
            return  # promoted by another reader meanwhile
        meta = self._meta_of(self.tiers[found], key) or EMPTY_META
        try:
            top.put_if_absent(key, data, meta, evict=False)
        except TierFullError:
            # Making room means demoting (maybe a disk write): not on the reader's time.
            self._submit_promotion(key)
        except (ChunkTooLargeError, TierIOError) as exc:
            log.debug("store: promotion to the %s tier skipped: %s", top.name, exc)
        else:
            self._maybe_relieve(0)

    def _submit_promotion(self, key: bytes) -> None:
        with self._cond:
            if key in self._promoting:
                return
            self._promoting.add(key)
        if not self._submit(_Job("promote", key), run_if_full=False):
            with self._cond:
                self._promoting.discard(key)

    # -- remove, events, lifecycle -----------------------------------------------------------------------
    def remove(self, key: bytes) -> bool:
        """Drop the chunk from every tier; ``True`` if any held it."""
        key = check_key(key)
        removed = False
        for tier in self.tiers:
            removed = tier.remove(key) or removed
        return removed

    def subscribe(self, listener: TierListener) -> Callable[[], None]:
        """Call ``listener`` for every event of every tier; returns a function that unsubscribes it."""
        return self._listeners.add(listener)

    def _forward(self, event: TierEvent) -> None:
        self._listeners.emit(event)

    @property
    def skipped_jobs(self) -> int:
        """Background items skipped because the queue was full (promotions, watermark demotions)."""
        return self._background.skipped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until background work is idle; ``False`` if ``timeout`` seconds passed first."""
        return self._background.flush(timeout)

    def close(self) -> None:
        """Finish background work (up to 30 s), stop the workers and close every tier."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._background.close(timeout=30.0)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for tier in self.tiers:
            try:
                tier.close()
            except Exception:
                log.exception("store: closing the %s tier failed", tier.name)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    # -- background work ---------------------------------------------------------------------------------
    def _maybe_relieve(self, index: int) -> None:
        if index >= len(self.tiers) - 1:
            return
        tier = self.tiers[index]
        if tier.used_bytes <= self._high * tier.capacity_bytes:
            return
        with self._cond:
            if index in self._relieving:
                return
            self._relieving.add(index)
        if not self._submit(_Job("relieve", tier=index), run_if_full=False):
            with self._cond:
                self._relieving.discard(index)

    def _submit(self, job: _Job, *, run_if_full: bool) -> bool:
        """Queue ``job`` on the background pool (see :class:`BackgroundPool` for a full queue)."""
        return self._background.submit(job, run_if_full=run_if_full)

    def _run_job(self, job: _Job) -> None:
        """Run one background item; a failure is logged and counted, never raised (workers survive)."""
        try:
            if job.kind == "copy_down":
                self._copy_down(job.key, job.tier)
            elif job.kind == "promote":
                self._promote(job.key)
            elif job.kind == "relieve":
                self._relieve(job.tier)
        except Exception as exc:
            self._count_error(job.kind)
            log.error(
                "store: background %s failed: %s", job.kind, exc, exc_info=not isinstance(exc, StoreError)
            )
        finally:
            if job.kind == "promote":
                with self._cond:
                    self._promoting.discard(job.key)
            elif job.kind == "relieve":
                with self._cond:
                    self._relieving.discard(job.tier)

    def _count_error(self, kind: str) -> None:
        with self._cond:
            self.background_errors += 1
        BACKGROUND_ERRORS.labels(kind=kind).inc()

    def _copy_down(self, key: bytes, index: int) -> None:
        """Write-through: copy the chunk from tier ``index`` to every lower tier."""
        handle = self.tiers[index].pin(key)
        if handle is None:
            return  # already evicted, hence demoted
        failure: Exception | None = None
        with handle:
            for lower in range(index + 1, len(self.tiers)):
                try:
                    self._store_at(lower, key, handle.data, handle.meta)
                except (ChunkTooLargeError, TierFullError) as exc:
                    # Not a failure: the tier cannot hold the chunk now (pinned full) or ever (too large).
                    log.debug("store: write-through to the %s tier skipped: %s", self.tiers[lower].name, exc)
                except TierIOError as exc:
                    failure = exc
        if failure is not None:
            raise failure

    def _promote(self, key: bytes) -> None:
        """Copy the chunk from the highest lower tier holding it into the top tier (making room)."""
        if self.tiers[0].contains(key):
            return
        for index in range(1, len(self.tiers)):
            handle = self.tiers[index].pin(key)
            if handle is None:
                continue
            with handle:
                try:
                    self._store_at(0, key, handle.data, handle.meta, promotion=True)
                except (TierFullError, ChunkTooLargeError) as exc:
                    # Promotion is an optimisation: a top tier pinned full (or too small) just skips it.
                    log.debug("store: promotion to the %s tier skipped: %s", self.tiers[0].name, exc)
                    return
            self._maybe_relieve(0)
            return

    def _relieve(self, index: int) -> None:
        """Demote the coldest chunks of tier ``index`` until it is under its low watermark."""
        tier = self.tiers[index]
        for _ in range(1024):
            excess = tier.used_bytes - int(self._low * tier.capacity_bytes)
            if excess <= 0:
                return
            victims = tier.victims(excess)
            if not victims:
                return
            for victim in victims:
                try:
                    self._demote(index, victim, must_free=False)
                except (ChunkTooLargeError, TierFullError) as exc:
                    # The tiers below cannot take it now: keep it; a put that needs the room will drop it.
                    log.debug("store: demotion out of the %s tier deferred: %s", tier.name, exc)
                    return
                except TierIOError as exc:
                    raise StoreError(f"demotion out of the {tier.name} tier failed: {exc}") from exc
