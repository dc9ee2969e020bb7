"""Where a worker's KV goes: an embedded Store, or cache servers through the Client.

Both backends give the worker half the same four operations, with the same failure semantics (every
failure is a miss or a skipped save, logged and counted, never an exception into vLLM):

- ``snapshot()`` / ``take_changes()``: what the rank's cache holds, then what changed (for the scheduler).
- ``load(keys, deadline)``: the chunks as pinned handles (``None`` for a miss); release every handle.
- ``save(key, nbytes, meta, fill)``: room for a chunk, filled by ``fill(buffer)`` (the gather kernel) on
  the caller's thread, published now (embedded) or pushed by a background thread (servers). ``False``
  means not saved (full, over the pending bound, closed).
- ``close()``.

The servers backend keeps a bounded pool of chunk buffers for staging (a fresh tensor costs page faults
on every use): loads and pending saves take from it, and a save that finds it empty is dropped, so the
forward pass never waits for the network.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvstrata.client import Client
from kvstrata.connector.metadata import TierChange
from kvstrata.core.chunk import ChunkHandle, ChunkMeta
from kvstrata.kvstore.store import Store
from kvstrata.kvstore.tier import TierEvent

__all__ = ["Backend", "BufferPool", "EmbeddedBackend", "ServersBackend"]

log = logging.getLogger(__name__)

Fill = Callable[[torch.Tensor], None]

#: Deadline of dropping a refused chunk on the servers (on the loader's thread, never vLLM's).
_DISCARD_TIMEOUT_S = 0.5


class Backend(ABC):
    """A worker's KV destination (see the module docstring)."""

    name = ""

    def __init__(self) -> None:
        self._changes: list[TierChange] = []
        self._changes_lock = threading.Lock()
        self.counters: dict[str, float] = {}
        self._counters_lock = threading.Lock()

    def count(self, name: str, value: float = 1) -> None:
        """Add to a counter (thread-safe)."""
        with self._counters_lock:
            self.counters[name] = self.counters.get(name, 0) + value

    def take_counters(self) -> dict[str, float]:
        """The counters since the last call."""
        with self._counters_lock:
            out, self.counters = self.counters, {}
        return out

    def _add_change(self, change: TierChange) -> None:
        with self._changes_lock:
            self._changes.append(change)

    def take_changes(self) -> list[TierChange]:
        """What changed in this rank's cache since the last call."""
        with self._changes_lock:
            out, self._changes = self._changes, []
        return out

    @abstractmethod
    def snapshot(self) -> list[TierChange]:
        """Everything this rank's cache holds (servers: nothing; their lookups tell)."""

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether the chunk is held here, as far as is known without I/O."""

    @abstractmethod
    def load(self, keys: Sequence[bytes], timeout: float) -> list[ChunkHandle | None]:
        """Pinned handles of the chunks (``None``: a miss); the caller releases them."""

    @abstractmethod
    def save(self, key: bytes, nbytes: int, meta: ChunkMeta, fill: Fill) -> bool:
        """Save one chunk that ``fill`` writes into the buffer given to it; ``False`` if not saved."""

    @abstractmethod
    def discard(self, key: bytes) -> None:
        """Drop a chunk the worker refused (corrupt, foreign); best effort, never raises."""

    def flush(self, timeout: float) -> bool:
        """Wait until pending saves are done (tests, shutdown); ``True`` if they are."""
        return True

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""


class EmbeddedBackend(Backend):
    """A Store inside the worker process (host tier, disk tier)."""

    name = "embedded"

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self._unsubscribe = store.subscribe(self._on_event)

    def _on_event(self, event: TierEvent) -> None:
        self._add_change(TierChange(event.kind, event.tier, tuple(event.keys), tuple(event.block_keys)))

    def snapshot(self) -> list[TierChange]:
        out = []
        for tier in self.store.tiers:
            try:
                keys = tuple(tier.keys())
                # The block keys too (from the catalog, no I/O): a KV event names blocks, so without them
                # what a restarted engine's disk tier holds could never be announced.
                blocks: list[bytes] = []
                for key in keys:
                    meta = tier.get_meta(key)
                    if meta is not None:  # evicted meanwhile: its key goes, its blocks are unknown
                        blocks.extend(meta.block_keys)
                out.append(TierChange("stored", tier.name, keys, tuple(blocks)))
            except Exception as exc:  # a failing medium is reported as empty, never fatal
                log.warning("kvstrata: cannot list the %s tier: %s", tier.name, exc)
        return out

    def contains(self, key: bytes) -> bool:
        return self.store.contains(key)

    def load(self, keys: Sequence[bytes], timeout: float) -> list[ChunkHandle | None]:
        try:
            return self.store.acquire_many(keys)
        except Exception as exc:  # the Store already turns a failing medium into misses; be sure
            log.warning("kvstrata: load from the embedded store failed: %s", exc)
            self.count("load_errors")
            return [None] * len(keys)

    def save(self, key: bytes, nbytes: int, meta: ChunkMeta, fill: Fill) -> bool:
        try:
            reservation = self.store.reserve(key, nbytes, meta)
            if reservation is not None:
                with reservation:
                    fill(reservation.data)
                    reservation.commit()
                return True
            # No room in the top tier's slots: fill a buffer and let put place it lower.
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            fill(buffer)
            self.store.put(key, buffer, meta)
            return True
        except Exception as exc:  # full, too large, failing medium: a future miss
            log.debug("kvstrata: save of a chunk skipped: %s", exc)
            self.count("save_errors")
            return False

    def discard(self, key: bytes) -> None:
        try:
            self.store.remove(key)  # its tier events tell the scheduler
        except Exception as exc:
            log.warning("kvstrata: cannot drop a refused chunk: %s", exc)

    def flush(self, timeout: float) -> bool:
        return self.store.flush(timeout)

    def close(self) -> None:
        self._unsubscribe()
        self.store.close()


class BufferPool:
    """Reusable uint8 host buffers of one size, at most ``max_bytes`` of them in all."""

    def __init__(self, nbytes: int, max_bytes: int, *, pin: bool = False) -> None:
        self.nbytes = nbytes
        self._limit = max(1, max_bytes // max(1, nbytes))
        self._pin = pin
        self._free: list[torch.Tensor] = []
        self._made = 0
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor | None:
        """A buffer, or ``None`` when all of them are in use."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._made >= self._limit:
                return None
            self._made += 1
        return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer taken from this pool."""
        with self._lock:
            self._free.append(buffer)


@dataclass(frozen=True, slots=True)
class _Pending:
    key: bytes
    buffer: torch.Tensor
    nbytes: int
    meta: ChunkMeta


class ServersBackend(Backend):
    """Cache servers (``kvs://``, ``kvs+shm://``, ``kvs+nixl://``) through a :class:`Client`."""

    name = "servers"

    def __init__(
        self, client: Client, chunk_bytes: int, max_pending_bytes: int, *, pin: bool = False
    ) -> None:
        super().__init__()
        self.client = client
        self._saves = BufferPool(chunk_bytes, max_pending_bytes, pin=pin)
        self._loads = BufferPool(chunk_bytes, max(max_pending_bytes, chunk_bytes), pin=pin)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        #: the servers refused a chunk as too large: every chunk would be
        self._refused = False
        self._thread = threading.Thread(target=self._push_loop, name="kvstrata-save", daemon=True)
        self._thread.start()

    def snapshot(self) -> list[TierChange]:
        return []

    def contains(self, key: bytes) -> bool:
        return False

    def load(self, keys: Sequence[bytes], timeout: float) -> list[ChunkHandle | None]:
        outs: list[torch.Tensor] = []
        for _ in keys:
            buffer = self._loads.take()
            if buffer is None:
                break
            outs.append(buffer)
        handles: list[ChunkHandle | None] = [None] * len(keys)
        if not outs:
            self.count("load_errors")
            return handles
        try:
            got = self.client.get_many(list(keys[: len(outs)]), outs, timeout=timeout)
        except Exception as exc:  # a dead or slow server: these chunks recompute
            log.warning("kvstrata: load from %s failed: %s", ",".join(self.client.urls), exc)
            self.count("load_errors")
            got = [None] * len(outs)
        for i, (buffer, data) in enumerate(zip(outs, got, strict=True)):
            if data is None:
                self._loads.give(buffer)
                continue
            handles[i] = ChunkHandle(
                keys[i], data, ChunkMeta(), release=functools.partial(self._loads.give, buffer)
            )
        return handles

    def discard(self, key: bytes) -> None:
        try:
            self.client.delete([key], timeout=_DISCARD_TIMEOUT_S)
        except Exception as exc:  # the next save of the chunk overwrites it anyway
            log.warning("kvstrata: cannot drop a refused chunk on the servers: %s", exc)

    def save(self, key: bytes, nbytes: int, meta: ChunkMeta, fill: Fill) -> bool:
        if self._closed or self._refused:
            if self._refused:
                self.count("saves_refused")
            return False
        buffer = self._saves.take() if nbytes <= self._saves.nbytes else None
        if buffer is None:
            self.count("saves_dropped")
            return False
        try:
            fill(buffer[:nbytes])
        except Exception:
            self._saves.give(buffer)
            raise
        with self._idle:
            self._pending += 1
        self._queue.put(_Pending(key, buffer, nbytes, meta))
        return True

    def _push_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:  # one put_many per server for everything queued meanwhile
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            self._push(batch)

    def _push(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            self.client.put_many(
                [p.key for p in batch], [p.buffer[: p.nbytes] for p in batch], [p.meta for p in batch]
            )
        except Exception as exc:  # a dead server, a full one: these are future misses
            if getattr(exc, "code", None) == "too_large" and not self._refused:
                # Not a passing failure: every chunk has this size, so every save would be refused.
                self._refused = True
                log.error(
                    "kvstrata: the servers refuse chunks of %d bytes (%s); saving is off. Start kvstrata "
                    "serve with --slot-size at least %d, or lower connector.chunk_tokens",
                    batch[0].nbytes,
                    exc,
                    batch[0].nbytes,
                )
            else:
                log.warning("kvstrata: saving %d chunks to the servers failed: %s", len(batch), exc)
            self.count("save_errors", len(batch))
        else:
            self.count("saved_chunks", len(batch))
            self.count("saved_bytes", sum(p.nbytes for p in batch))
            self.count("save_seconds", time.perf_counter() - start)
            keys = tuple(p.key for p in batch)
            blocks = tuple(b for p in batch for b in p.meta.block_keys)
            self._add_change(TierChange("stored", "remote", keys, blocks))
        finally:
            for pending in batch:
                self._saves.give(pending.buffer)
            with self._idle:
                self._pending -= len(batch)
                self._idle.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush(2.0)
        self._queue.put(None)
        self._thread.join(2.0)
        self.client.close()
