"""``Catalog``: the key -> entry map of a tier and its eviction order, shared by the disk, memory and remote
tiers.

Each of those tiers keeps, under its one lock, a dict of its chunks' entries (metadata, pins and whatever
locates the bytes) and an eviction policy over the same keys. The catalog holds both so that they change
together, and answers the parts of the :class:`~kvstrata.kvstore.tier.Tier` contract that need only the
entries: ``contains``, ``get_meta``, ``keys``, ``size_of``, ``victims`` and ``len``.

Locking: the catalog has no lock of its own. It is given the tier's lock, because that lock also guards
the tier's other state (byte counts, the slot pool, the closed flag) and an entry must change in the same
critical section as that state. The methods named after the Tier's (``contains``, ``get_meta``, ``keys``,
``size_of``, ``victims``) and ``len()`` take the lock; every other method expects the caller to hold it.

Sizes differ per tier, so the tier passes two functions of an entry: ``charge``, the bytes its eviction
frees (a file with its header; a slot of its size class; the quota), summed by :meth:`Catalog.victims` and
:meth:`Catalog.coldest`; and ``length``, what :meth:`Catalog.size_of` answers (the payload).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from kvstrata.core.chunk import ChunkMeta, check_key
from kvstrata.kvstore.eviction import EvictionPolicy

__all__ = ["Catalog", "CatalogEntry"]


class CatalogEntry(Protocol):
    """What the catalog reads of a tier's entry (read-only here: the tier owns the entry)."""

    @property
    def meta(self) -> ChunkMeta: ...

    @property
    def pins(self) -> int: ...


E = TypeVar("E", bound=CatalogEntry)


class Catalog(Generic[E]):
    """A tier's entries and their eviction order, guarded by the tier's lock (see the module docstring)."""

    __slots__ = ("_charge", "_entries", "_length", "_lock", "_policy")

    def __init__(
        self,
        lock: threading.Lock,
        policy: EvictionPolicy,
        *,
        charge: Callable[[E], int],
        length: Callable[[E], int],
    ) -> None:
        self._lock = lock
        self._policy = policy
        self._charge = charge
        self._length = length
        self._entries: dict[bytes, E] = {}

    # -- with the tier's lock held ---------------------------------------------------------------------
    def get(self, key: bytes) -> E | None:
        """The key's entry, or ``None``."""
        return self._entries.get(key)

    def __getitem__(self, key: bytes) -> E:
        """The entry of a key known to be present (a policy candidate, a planned victim)."""
        return self._entries[key]

    def add(self, key: bytes, entry: E, weight: int) -> None:
        """Store ``entry`` under ``key`` and insert the key in the policy with ``weight`` bytes (the caller
        pops an older entry first: its bytes are the tier's to account for)."""
        self._entries[key] = entry
        self._policy.insert(key, weight)

    def pop(self, key: bytes) -> E | None:
        """Forget ``key`` (entry and policy); its entry, or ``None`` if it was absent."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._policy.remove(key)
        return entry

    def touch(self, key: bytes) -> None:
        """Record a hit on ``key`` in the policy."""
        self._policy.touch(key)

    def unpinned(self) -> Iterator[tuple[bytes, E]]:
        """The unpinned keys and entries in eviction order, coldest first; lazy, so a caller that stops
        early walks the policy no further (S3-FIFO moves the read keys its walk passes)."""
        entries = self._entries
        for key in self._policy.candidates():
            entry = entries[key]
            if entry.pins:
                continue
            yield key, entry

    def coldest(self, num_bytes: int) -> tuple[list[tuple[bytes, E]], int]:
        """The shortest run of :meth:`unpinned` whose charges reach ``num_bytes`` (all of them if they fall
        short), and the bytes they free; ``[]`` for ``num_bytes <= 0``. The walk stops at the last one."""
        chosen: list[tuple[bytes, E]] = []
        freed = 0
        if num_bytes <= 0:
            return chosen, freed
        charge = self._charge
        for key, entry in self.unpinned():
            chosen.append((key, entry))
            freed += charge(entry)
            if freed >= num_bytes:
                break
        return chosen, freed

    def clear(self) -> None:
        """Forget every entry (the tier is closing; the policy is left as it is)."""
        self._entries.clear()

    # -- taking the lock ---------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        """Whether ``key`` has an entry (not an access)."""
        key = check_key(key)
        with self._lock:
            return key in self._entries

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """The key's metadata, or ``None`` if absent (not an access)."""
        key = check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.meta

    def keys(self) -> Iterator[bytes]:
        """A snapshot of the keys, in the order they were added."""
        with self._lock:
            return iter(list(self._entries))

    def size_of(self, key: bytes) -> int | None:
        """The key's ``length``, or ``None`` if absent."""
        key = check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else self._length(entry)

    def victims(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys whose charges add up to at least ``num_bytes``, in eviction order.

        Unlike :meth:`coldest`, this asks the policy for the candidate after the last victim before it
        stops, as the disk and remote tiers' ``victims`` always have: S3-FIFO moves the read keys its walk
        passes, so the two walks leave it in different states, and each tier keeps the one it had.
        """
        out: list[bytes] = []
        freed = 0
        with self._lock:
            for key in self._policy.candidates():
                if freed >= num_bytes:
                    break
                entry = self._entries[key]
                if entry.pins:
                    continue
                out.append(key)
                freed += self._charge(entry)
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
