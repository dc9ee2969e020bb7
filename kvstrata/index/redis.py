"""The shared block index on Redis (backend ``"redis://…"``, also ``rediss://`` and ``unix://``).

Key schema (every key of a namespace carries the hash tag ``{kvs:<namespace>}``, so one namespace — one
model and KV layout — lives in one Redis Cluster slot and the Lua scripts may touch all of its keys)::

    {kvs:NS}:b:<16-byte block key>   hash   field <tier digit><instance id> -> epoch it was written in
    {kvs:NS}:ids                     hash   instance name -> instance id (small integer)
    {kvs:NS}:names                   hash   instance id -> instance name
    {kvs:NS}:next                    string the last instance id given out
    {kvs:NS}:epochs                  hash   instance id -> current epoch (absent: 0)
    {kvs:NS}:lease:<instance name>   string with a TTL: the instance is live while it exists

- A lookup is one ``EVALSHA`` of :data:`~kvstrata.index.redis_scripts.WALK`: a prefix walk that stops at the
  first block no live instance still in the prefix holds. Fields of a dead instance (no lease key) or of an
  older epoch are ignored.
- ``clear`` is one ``HINCRBY`` of the instance's epoch; stale fields are left for the block entries' expiry
  (``IndexConfig.block_ttl_s``, renewed on every write), which bounds the memory they can hold.
- Writes go to a bounded buffer and a background thread sends them in pipelined batches of ``EVALSHA``
  :data:`~kvstrata.index.redis_scripts.WRITE` calls (one per run of same-instance, same-tier keys).

Connection loss: a lookup answers "no match" (``degraded``), logs (rate-limited) and counts the error;
writes stay in the buffer and are retried with back-off; when the buffer is full the oldest writes are
dropped and counted. redis-py reconnects by itself, so the index recovers when Redis is back. A Redis that
restarts without persistence has lost its entries: the writes buffered during the outage are replayed, and
later engine events repopulate the rest. Replaying a batch that was partly applied before the connection
broke is harmless: adds and removes are idempotent, and a repeated clear only bumps the epoch once more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvstrata.core.keys import KEY_BYTES
from kvstrata.errors import IndexUnavailableError, InvalidArgumentError
from kvstrata.index.base import (
    TIERS,
    BlockIndex,
    IndexStats,
    InstanceInfo,
    InstanceMatch,
    LookupResult,
    RateLimitedLog,
    check_block_keys,
    check_instance,
    tier_index,
)
from kvstrata.index.redis_scripts import INSTANCES, WALK, WRITE

if TYPE_CHECKING:
    from kvstrata.config import IndexConfig

__all__ = ["RedisBlockIndex"]

log = logging.getLogger(__name__)

#: keys per EVALSHA of the write script (bounds the work Redis does in one script call)
_KEYS_PER_CALL = 2048
#: keys per pipelined flush
_KEYS_PER_FLUSH = 32768


class _Op:
    __slots__ = ("instance", "keys", "op", "tier")

    def __init__(self, op: str, instance: str, tier: int, keys: list[bytes]) -> None:
        self.op = op
        self.instance = instance
        self.tier = tier
        self.keys = keys

    @property
    def weight(self) -> int:
        return max(1, len(self.keys))


class RedisBlockIndex(BlockIndex):
    """The block index in Redis, shared by every router and ingester that names the same namespace."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        config: IndexConfig | None = None,
        lease_ttl_s: float | None = None,
        flush_interval_s: float | None = None,
    ) -> None:
        super().__init__()
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if config is None:
            from kvstrata.config import IndexConfig

            config = IndexConfig()
        if not namespace or any(c in namespace for c in "{}"):
            raise InvalidArgumentError("a Redis index namespace is a non-empty string without braces")
        self._errors_cls: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)
        self._transient: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            OSError,
        )
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=config.redis_timeout_s,
            socket_connect_timeout=config.redis_timeout_s,
            # one immediate retry: a pooled connection broken by a Redis restart fails once, then reconnects
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        tag = f"{{kvs:{namespace}}}"
        self.namespace = namespace
        self._k_ids = f"{tag}:ids".encode()
        self._k_names = f"{tag}:names".encode()
        self._k_next = f"{tag}:next".encode()
        self._k_epochs = f"{tag}:epochs".encode()
        self._lease_prefix = f"{tag}:lease:".encode()
        self._block_prefix = f"{tag}:b:".encode()
        self._walk = self._redis.register_script(WALK)
        self._write = self._redis.register_script(WRITE)
        self._instances = self._redis.register_script(INSTANCES)
        self._ttl_ms = max(1, int((lease_ttl_s if lease_ttl_s is not None else config.lease_ttl_s) * 1000))
        self._block_ttl = max(0, int(config.block_ttl_s))
        self._interval = flush_interval_s if flush_interval_s is not None else config.flush_interval_s
        self._capacity = max(1, config.write_buffer)
        self._buffer: deque[_Op] = deque()
        self._buffered = 0  # weight of the ops in the buffer and in flight
        self._inflight = 0
        self._cond = threading.Condition()
        self._lookup_log = RateLimitedLog(log)
        self._write_log = RateLimitedLog(log)
        self._stop = False
        self._flusher = threading.Thread(target=self._flush_loop, name="kvstrata-index-redis", daemon=True)
        self._flusher.start()

    # -- writes -------------------------------------------------------------------------------------
    def _enqueue(self, op: _Op) -> None:
        with self._cond:
            self._check_open()
            last = self._buffer[-1] if self._buffer else None
            if (
                last is not None
                and last.op == op.op
                and op.op in "ar"
                and last.instance == op.instance
                and last.tier == op.tier
                and len(last.keys) < _KEYS_PER_CALL
            ):
                last.keys.extend(op.keys)  # coalesce: one script call for a run of same-target keys
            else:
                self._buffer.append(op)
            self._buffered += op.weight
            self._drop_overflow()
            self.stats.buffered = self._buffered
            self._cond.notify_all()

    def _drop_overflow(self) -> None:
        while self._buffered > self._capacity and self._buffer:
            victim = self._buffer.popleft()
            self._buffered -= victim.weight
            self.stats.dropped_writes += victim.weight
            self._write_log.warning("redis index: write buffer full, dropped %d writes", victim.weight)

    def add(self, instance: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that ``instance`` holds ``keys`` in ``tier`` (sent in the background)."""
        op = _Op("a", check_instance(instance), tier_index(tier), check_block_keys(keys))
        if op.keys:
            self._enqueue(op)
            self.stats.blocks_added += len(op.keys)

    def remove(self, instance: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that ``instance`` no longer holds ``keys`` in ``tier`` (sent in the background)."""
        op = _Op("r", check_instance(instance), tier_index(tier), check_block_keys(keys))
        if op.keys:
            self._enqueue(op)
            self.stats.blocks_removed += len(op.keys)

    def clear(self, instance: str) -> None:
        """Bump the epoch of ``instance`` (sent in the background, in order with its other writes)."""
        self._enqueue(_Op("c", check_instance(instance), 0, []))
        self.stats.clears += 1

    def heartbeat(self, instance: str, ttl_s: float | None = None) -> None:
        """Renew the lease of ``instance`` (sent in the background)."""
        op = _Op("h", check_instance(instance), 0, [])
        if ttl_s is not None:
            op.tier = max(1, int(ttl_s * 1000))  # heartbeats carry their TTL in the tier slot
        self._enqueue(op)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every earlier write reached Redis; ``False`` if not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._buffered:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def _take_batch(self) -> list[_Op]:
        batch: list[_Op] = []
        weight = 0
        while self._buffer and weight < _KEYS_PER_FLUSH:
            op = self._buffer.popleft()
            batch.append(op)
            weight += op.weight
        self._inflight = weight
        return batch

    def _send(self, batch: list[_Op]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        head = [self._k_ids, self._k_names, self._k_next, self._k_epochs]
        prefix = self._block_prefix
        for op in batch:
            lease = self._lease_prefix + op.instance.encode()
            ttl = op.tier if op.op == "h" and op.tier else self._ttl_ms
            tier = b"0" if op.op == "h" else str(op.tier).encode()
            keys = op.keys
            for start in range(0, max(1, len(keys)), _KEYS_PER_CALL):
                packed = b"".join(keys[start : start + _KEYS_PER_CALL])
                self._write(
                    keys=[*head, lease],
                    args=[op.op, op.instance, tier, ttl, self._block_ttl, prefix, packed],
                    client=pipe,
                )
        pipe.execute()

    def _flush_loop(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._buffer and not self._stop:
                    self._cond.wait(self._interval if self._interval > 0 else None)
                if self._stop and (not self._buffer or self._closed):
                    return
                batch = self._take_batch()
            try:
                self._send(batch)
            except self._transient as exc:
                self.stats.errors += 1
                self._write_log.warning("redis index: writes deferred, Redis unreachable: %s", exc)
                with self._cond:
                    self._buffer.extendleft(reversed(batch))
                    self._inflight = 0
                    self._drop_overflow()
                    self.stats.buffered = self._buffered
                    if self._stop:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            except self._errors_cls as exc:
                # not a connection problem (a script or server error): retrying would fail the same way
                self.stats.errors += 1
                self.stats.dropped_writes += sum(op.weight for op in batch)
                log.error("redis index: write batch rejected, dropped: %s", exc)
            backoff = 0.05
            with self._cond:
                self._buffered -= self._inflight
                self._inflight = 0
                self.stats.buffered = self._buffered
                self._cond.notify_all()

    # -- reads --------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """Per live instance, its longest consecutive prefix of ``keys``; "no match" if Redis is down."""
        self._check_open()
        n = len(keys)
        self.stats.lookups += 1
        if not n:
            return LookupResult(0)
        packed = b"".join(keys)
        if len(packed) != KEY_BYTES * n:
            # a key of the wrong length never matches, so the prefix ends before the first one
            good = next(i for i, k in enumerate(keys) if len(k) != KEY_BYTES)
            packed = b"".join(keys[:good])
        try:
            raw = self._walk(
                keys=[self._k_names, self._k_epochs],
                args=[self._lease_prefix, self._block_prefix, packed],
            )
        except self._errors_cls as exc:
            self.stats.errors += 1
            self._lookup_log.warning("redis index: lookup answered 'no match', Redis unreachable: %s", exc)
            return LookupResult(n, degraded=True)
        return LookupResult(n, _parse_walk(raw))

    def instances(self) -> list[InstanceInfo]:
        """The live instances; raises :class:`IndexUnavailableError` when Redis cannot be reached."""
        self._check_open()
        try:
            raw = self._instances(keys=[self._k_names, self._k_epochs], args=[self._lease_prefix])
        except self._errors_cls as exc:
            self.stats.errors += 1
            raise IndexUnavailableError(f"Redis index unreachable: {exc}") from exc
        out = [
            InstanceInfo(_text(raw[j]), int(raw[j + 1]), int(raw[j + 2]) / 1000.0)
            for j in range(0, len(raw), 3)
        ]
        return sorted(out, key=lambda info: info.instance)

    def snapshot_stats(self) -> IndexStats:
        """Counters (``entries`` is not known cheaply: -1)."""
        with self._cond:
            s = self.stats
            return IndexStats(
                lookups=s.lookups,
                blocks_added=s.blocks_added,
                blocks_removed=s.blocks_removed,
                clears=s.clears,
                errors=s.errors,
                dropped_writes=s.dropped_writes,
                buffered=self._buffered,
                evictions=0,
                entries=-1,
            )

    def close(self) -> None:
        """Send what is buffered (for up to ``redis_timeout_s``), stop the flusher, close the connections."""
        if self._closed:
            return
        self.flush(timeout_s=1.0)
        with self._cond:
            self._stop = True
            self._closed = True
            self._cond.notify_all()
        self._flusher.join(timeout=5.0)
        self._redis.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_walk(raw: Sequence[Any]) -> dict[str, InstanceMatch]:
    matches: dict[str, InstanceMatch] = {}
    for j in range(0, len(raw), 2 + len(TIERS)):
        name = _text(raw[j])
        depths = {TIERS[t]: int(raw[j + 2 + t]) for t in range(len(TIERS)) if int(raw[j + 2 + t]) > 0}
        matches[name] = InstanceMatch(name, int(raw[j + 1]), depths)
    return matches
