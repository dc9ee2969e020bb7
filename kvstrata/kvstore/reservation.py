"""Writing a chunk in place into the Store's top tier: :class:`StoreReservation`, and
:class:`ReservingStore`, the base of :class:`~kvstrata.kvstore.store.Store` that holds its ``reserve``,
``reserve_many`` and ``commit_many``.

A writer that can fill the bytes itself (a socket's ``recv_into``, a shared-memory or nixl put lease)
reserves a slot, writes into it and commits it, saving the copy a ``put`` makes. These wrap the top tier's
:meth:`~kvstrata.kvstore.memory.PooledTier.reserve` with the two steps a ``put`` takes around it: making room
(victims demoted one tier down first) and, once committed, dropping stale copies in the other tiers and
queueing write-through. Those steps are the Store's own, shared with ``put``; :class:`ReservingStore` declares
them abstract so that this module needs nothing of the Store's but them (and no import of it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from kvstrata.core.chunk import EMPTY_META, ChunkMeta, check_key
from kvstrata.errors import ChunkTooLargeError, InvalidArgumentError, TierFullError, TierIOError
from kvstrata.kvstore.memory import PooledTier, SlotReservation

__all__ = ["ReservingStore", "StoreReservation"]

_T = TypeVar("_T")


class StoreReservation:
    """A slot reserved in the Store's top tier (see :meth:`Store.reserve`): fill :attr:`data`, then
    :meth:`commit` or :meth:`abort`; as a context manager it aborts unless committed."""

    __slots__ = ("_res", "_store")

    def __init__(self, store: ReservingStore, res: SlotReservation) -> None:
        self._store = store
        self._res = res

    @property
    def key(self) -> bytes:
        """The chunk's key."""
        return self._res.key

    @property
    def nbytes(self) -> int:
        """The chunk's length."""
        return self._res.nbytes

    @property
    def data(self) -> torch.Tensor:
        """The writable uint8 view of exactly :attr:`nbytes` bytes of the slot."""
        return self._res.data

    @property
    def mem(self) -> memoryview | None:
        """The same bytes as a flat writable memoryview (a host pool; ``None`` otherwise)."""
        return self._res.mem

    @property
    def offset(self) -> int:
        """The slot's byte offset in the top tier's pool buffer."""
        return self._res.offset

    @property
    def active(self) -> bool:
        """Neither committed nor aborted yet."""
        return self._res.active

    def commit(self, key: bytes | None = None, meta: ChunkMeta | None = None) -> None:
        """Publish the chunk (replacing an older value) and drop stale copies in the other tiers, as
        :meth:`Store.put` does. ``key`` and ``meta`` replace those given to :meth:`Store.reserve` (for
        writers that learn them late). Raises :class:`StoreError` if the store closed meanwhile (nothing
        is published then) and :class:`InvalidArgumentError` if already committed or aborted."""
        self._res.commit(key, meta)
        self._store._published(0, self._res.key)

    def abort(self) -> None:
        """Free the slot; nothing becomes visible. A no-op once committed or aborted."""
        self._res.abort()

    def rename(self, key: bytes, meta: ChunkMeta | None = None) -> None:
        """Set the key (and meta) the chunk is committed under, for writers that learn them only after
        writing and commit with :meth:`Store.commit_many`; raises :class:`InvalidArgumentError` for a bad
        key (nothing changes then)."""
        self._res.key = check_key(key)
        if meta is not None:
            self._res.meta = meta

    def __enter__(self) -> StoreReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self._res.abort()


class ReservingStore(ABC):
    """The Store's reservations in its top tier (see the module docstring); the Store provides the
    abstract steps below, which its ``put`` uses too."""

    #: the top tier when it takes reservations (a host-memory pool, decided by the Store), else ``None``
    _reservable: PooledTier | None

    @abstractmethod
    def _check_open(self) -> None:
        """Raise :class:`~kvstrata.errors.StoreError` when the store is closed."""

    @abstractmethod
    def _with_room(self, index: int, nbytes: int, place: Callable[[bool], _T]) -> _T:
        """``place(evict)`` a ``nbytes`` chunk in tier ``index``, demoting its victims first when full."""

    @abstractmethod
    def _published(self, landed: int, key: bytes) -> None:
        """After ``key`` landed in tier ``landed``: drop stale copies, queue write-through."""

    @abstractmethod
    def _published_many(self, landed: int, keys: Sequence[bytes]) -> None:
        """:meth:`_published` for several keys that landed in the same tier."""

    def reserve(self, key: bytes, nbytes: int, meta: ChunkMeta = EMPTY_META) -> StoreReservation | None:
        """Reserve a slot for a ``nbytes`` chunk in the top tier, to be filled in place and committed.

        Call order: ``reserve`` -> fill ``reservation.data`` (or, for a writer mapping the pool buffer,
        the bytes at ``reservation.offset``) -> ``reservation.commit()`` or ``reservation.abort()`` (a
        ``with`` block aborts unless committed). Room is made exactly as :meth:`Store.put` makes it in that
        tier (victims demoted one tier down first). Until the commit nothing is visible and the slot is
        pinned; the commit publishes the chunk atomically and, as a put does, drops older copies of the key in
        the other tiers and queues write-through copies. An abort frees the slot and leaves every tier as it
        was (apart from victims already demoted to make room).

        Returns ``None`` when the top tier is not a host-memory pooled tier, the chunk is larger than its
        slots, or no room can be made in it: the caller then falls back to :meth:`Store.put` (which may
        still place the chunk in a lower tier). Raises :class:`StoreError` when the store is closed.
        """
        key = check_key(key)
        self._check_open()
        tier = self._reservable
        if tier is None:
            return None
        if not 0 <= nbytes <= tier.slot_bytes:
            return None

        def take(evict: bool) -> SlotReservation:
            return tier.reserve(key, nbytes, meta, evict=evict)

        try:
            res = self._with_room(0, nbytes, take)
        except (ChunkTooLargeError, TierFullError, TierIOError):
            return None
        return StoreReservation(self, res)

    def reserve_many(self, specs: Sequence[tuple[bytes, int, ChunkMeta]]) -> list[StoreReservation]:
        """Reservations for the leading ``specs`` (key, nbytes, meta), as :meth:`reserve` makes them, stopping
        at the first that gets none (so the caller can commit those before it: they may be what it has to
        evict). Those that fit without evicting are taken together under one lock. Commit them with
        :meth:`commit_many` (or one by one); a ``with`` on each, or ``abort()``, frees what is not committed.
        """
        self._check_open()
        tier = self._reservable
        if tier is None or not specs:
            return []
        out = [StoreReservation(self, res) for res in tier.reserve_many(specs)]
        try:
            for key, nbytes, meta in specs[len(out) :]:
                res = self.reserve(key, nbytes, meta)
                if res is None:
                    break
                out.append(res)
        except BaseException:
            for res in out:
                res.abort()
            raise
        return out

    def commit_many(self, reservations: Sequence[StoreReservation]) -> list[BaseException | None]:
        """Commit reservations of :meth:`reserve` / :meth:`reserve_many` together (one lock, one stored
        event); per reservation, ``None`` or the error its own ``commit()`` would have raised."""
        tier = self._reservable
        if tier is None:
            return [InvalidArgumentError("this store takes no reservations")] * len(reservations)
        results = tier.commit_many([r._res for r in reservations])
        landed = [r.key for r, error in zip(reservations, results, strict=True) if error is None]
        if landed:
            self._published_many(0, landed)
        return results
