"""The ``BlockIndex`` contract: which instance holds which blocks, in which tier.

An index maps 16-byte block keys (:func:`kvstrata.core.keys.block_keys`) to the (instance, tier) pairs
that hold them. It answers one question fast: for a prompt's block keys, how long a consecutive prefix does
each live instance hold, and how deep does that prefix reach in each of its tiers.

Call order and semantics
------------------------
- ``heartbeat(instance, ttl_s=None)`` renews the instance's lease (``lease_ttl_s`` of the config when
  ``ttl_s`` is None). Writes (``add``, ``remove``, ``clear``) renew it too: an event is evidence of life.
  An instance whose lease ran out stops counting in lookups and in :meth:`instances` (its entries are kept
  and count again if it comes back; only ``clear`` forgets them).
- ``add(instance, tier, keys)`` / ``remove(instance, tier, keys)`` record that ``instance`` holds / no longer
  holds ``keys`` in ``tier`` (one of :data:`TIERS`). Both are idempotent.
- ``clear(instance)`` forgets everything the instance holds, in O(1): it bumps the instance's epoch, and
  entries written under an older epoch stop counting at once (they are reclaimed lazily).
- ``lookup(keys)`` returns a :class:`LookupResult`: per live instance that holds at least the first block,
  its longest consecutive prefix and, per tier, the longest consecutive prefix held in that tier. Lookups
  do not validate keys (they are on the request path): a key that is not 16 bytes never matches.
- ``flush(timeout_s)`` makes every write issued before it visible to lookups (backends that batch writes,
  like Redis, apply them in the background); returns ``False`` if that could not be done in time.
- ``close()`` stops background work; calls after it raise :class:`BlockIndexError`.

Failure semantics
-----------------
Entries are hints: a consumer acting on a stale one gets a miss downstream, never an error. Hence an index
whose backend is unreachable does not raise from ``lookup``: it answers "no match" with
``LookupResult.degraded`` set, logs and counts the error. Writes are buffered (bounded) and retried; when
the buffer overflows the oldest writes are dropped and counted. Bad arguments (a key that is not 16 bytes, an
unknown tier) raise :class:`InvalidArgumentError`. All methods are thread-safe.

Backends are chosen by name from a lazy registry (:func:`open_index`): ``"memory"`` (in-process, the
embedded default) and ``"redis://…"`` (shared; imports redis only when selected).
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstrata.core.keys import KEY_BYTES
from kvstrata.errors import BlockIndexError, InvalidArgumentError

if TYPE_CHECKING:
    from kvstrata.config import IndexConfig

__all__ = [
    "TIERS",
    "BlockIndex",
    "IndexStats",
    "InstanceInfo",
    "InstanceMatch",
    "LookupResult",
    "RateLimitedLog",
    "check_block_keys",
    "open_index",
    "register_backend",
    "tier_index",
]

log = logging.getLogger(__name__)

#: The tiers an index knows, fastest first (the names of kvstrata's Tier kinds).
TIERS: tuple[str, ...] = ("device", "host", "disk", "remote")
_TIER_INDEX = {name: i for i, name in enumerate(TIERS)}


def tier_index(tier: str) -> int:
    """The position of ``tier`` in :data:`TIERS`; raises :class:`InvalidArgumentError` for an unknown one."""
    try:
        return _TIER_INDEX[tier]
    except KeyError:
        raise InvalidArgumentError(f"unknown tier {tier!r}; known: {', '.join(TIERS)}") from None


def check_block_keys(keys: Iterable[bytes]) -> list[bytes]:
    """Validate block keys (16 bytes each) and return them as a list of ``bytes``."""
    out = keys if isinstance(keys, list) and set(map(type, keys)) <= {bytes} else [bytes(k) for k in keys]
    if set(map(len, out)) - {KEY_BYTES}:
        bad = next(len(k) for k in out if len(k) != KEY_BYTES)
        raise InvalidArgumentError(f"a block key is {KEY_BYTES} bytes, got {bad}")
    return list(out)


def check_instance(instance: str) -> str:
    """Validate an instance name: a non-empty string of at most 256 characters."""
    if not isinstance(instance, str) or not instance or len(instance) > 256:
        raise InvalidArgumentError("an instance name is a non-empty string of at most 256 characters")
    return instance


@dataclass(frozen=True, slots=True)
class InstanceMatch:
    """What one instance holds of a prompt.

    ``blocks`` is the longest consecutive prefix it holds in any mix of tiers; ``tiers[t]`` is the longest
    consecutive prefix held in tier ``t`` alone (tiers holding not even the first block are absent), so
    ``max(tiers.values()) <= blocks``.
    """

    instance: str
    blocks: int
    tiers: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The answer to a lookup: per instance, its match (only instances that hold the first block).

    ``degraded`` is set when the backend could not be asked (the result is then empty: no match).
    """

    num_blocks: int
    matches: Mapping[str, InstanceMatch] = field(default_factory=dict)
    degraded: bool = False

    def best(self) -> InstanceMatch | None:
        """The instance with the longest prefix (ties broken by name), or ``None`` when nothing matches."""
        if not self.matches:
            return None
        return max(self.matches.values(), key=lambda m: (m.blocks, m.instance))

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly form (what the HTTP lookup endpoint returns)."""
        return {
            "num_blocks": self.num_blocks,
            "degraded": self.degraded,
            "matches": [
                {"instance": m.instance, "blocks": m.blocks, "tiers": dict(m.tiers)}
                for m in sorted(self.matches.values(), key=lambda m: (-m.blocks, m.instance))
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LookupResult:
        """The inverse of :meth:`to_json`."""
        matches = {
            str(m["instance"]): InstanceMatch(
                str(m["instance"]), int(m["blocks"]), {str(k): int(v) for k, v in m["tiers"].items()}
            )
            for m in data.get("matches", [])
        }
        return cls(int(data["num_blocks"]), matches, bool(data.get("degraded", False)))


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """A live instance: its name, its current epoch, and the seconds left on its lease."""

    instance: str
    epoch: int
    lease_left_s: float


@dataclass(slots=True)
class IndexStats:
    """Counters of an index since it was opened."""

    lookups: int = 0
    blocks_added: int = 0
    blocks_removed: int = 0
    clears: int = 0
    #: backend errors (lookups answered "no match", write batches that failed and were retried)
    errors: int = 0
    #: writes dropped because the retry buffer was full
    dropped_writes: int = 0
    #: block keys waiting in the write buffer
    buffered: int = 0
    #: entries evicted by the memory backend's LRU bound
    evictions: int = 0
    #: entries held (memory backend), or -1 when not known cheaply
    entries: int = -1


class BlockIndex(ABC):
    """The global block index. See the module docstring for call order and failure semantics."""

    def __init__(self) -> None:
        self.stats = IndexStats()
        self._closed = False

    @abstractmethod
    def add(self, instance: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that ``instance`` holds ``keys`` in ``tier``."""

    @abstractmethod
    def remove(self, instance: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that ``instance`` no longer holds ``keys`` in ``tier``."""

    @abstractmethod
    def clear(self, instance: str) -> None:
        """Forget everything ``instance`` holds (an O(1) epoch bump)."""

    @abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """Per live instance, its longest consecutive prefix of ``keys`` and its depth per tier."""

    @abstractmethod
    def heartbeat(self, instance: str, ttl_s: float | None = None) -> None:
        """Renew the lease of ``instance`` for ``ttl_s`` seconds (the configured TTL when None)."""

    @abstractmethod
    def instances(self) -> list[InstanceInfo]:
        """The live instances, sorted by name."""

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Make every earlier write visible to lookups; ``False`` if not done within ``timeout_s``."""
        return True

    def close(self) -> None:
        """Stop background work and release connections; idempotent."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise BlockIndexError("the index is closed")

    def __enter__(self) -> BlockIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RateLimitedLog:
    """Log a recurring error at most once per ``interval_s`` (with a count of the ones suppressed)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last = -1e18
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        """Log ``message`` unless one was logged less than ``interval_s`` ago."""
        now = time.monotonic()
        if now - self._last >= self._interval:
            suffix = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
            self._logger.warning(message + suffix, *args)
            self._last = now
            self._suppressed = 0
        else:
            self._suppressed += 1


# -- the lazy registry ------------------------------------------------------------------------------------
_BACKENDS: dict[str, str] = {
    "memory": "kvstrata.index.memory:MemoryBlockIndex",
    "redis": "kvstrata.index.redis:RedisBlockIndex",
    "rediss": "kvstrata.index.redis:RedisBlockIndex",
    "unix": "kvstrata.index.redis:RedisBlockIndex",
}


def register_backend(scheme: str, target: str) -> None:
    """Register a backend: ``scheme`` (a name, or a URL scheme) -> ``"module:ClassName"``, imported lazily."""
    _BACKENDS[scheme] = target


def open_index(
    spec: str | None = None,
    *,
    namespace: str = "default",
    config: IndexConfig | None = None,
    **options: Any,
) -> BlockIndex:
    """Open the index named by ``spec``: ``"memory"`` or a ``redis://`` / ``rediss://`` / ``unix://`` URL.

    ``spec`` defaults to ``config.backend``. ``namespace`` scopes a shared backend's keys (use
    ``Namespace.id.hex()`` so that each model/layout has its own hash tag); the memory backend ignores it.
    """
    if config is None:
        from kvstrata.config import IndexConfig

        config = IndexConfig()
    spec = spec or config.backend
    scheme = spec.split("://", 1)[0] if "://" in spec else spec
    target = _BACKENDS.get(scheme)
    if target is None:
        raise InvalidArgumentError(f"unknown index backend {spec!r}; known: {', '.join(sorted(_BACKENDS))}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if "://" in spec:
        return cls(spec, namespace=namespace, config=config, **options)  # type: ignore[no-any-return]
    return cls(config=config, **options)  # type: ignore[no-any-return]
