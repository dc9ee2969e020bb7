"""``RemoteTier``: the Store's remote tier — chunks kept on kvstrata cache servers through a :class:`Client`.

The tier owns a *quota* of ``capacity_bytes`` on the servers and keeps a local catalog of the chunks it
put there (sizes, metadata, recency under its eviction policy). Eviction, victims and pins work on that
catalog; evicting a chunk deletes it on its server. Reads always ask the server, so a chunk the server
lost is a miss (and leaves the catalog), and chunks put by other instances are found too.

Semantics follow :mod:`kvstrata.kvstore.tier`, with these remote specifics:

- ``acquire`` fetches the chunk into a local tensor (there is no remote memory to pin); the pin keeps the
  key out of eviction, and the handle's bytes never change.
- A server that cannot be reached (or times out) is a medium failure: ``put`` raises
  :class:`TierIOError`, ``get`` / ``acquire`` count an error and raise :class:`TierIOError` (the Store logs
  and skips the tier), ``contains`` answers from the catalog alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from kvstrata.core.buffers import BufferLike, as_byte_tensor
from kvstrata.core.chunk import EMPTY_META, ChunkHandle, ChunkMeta, check_key
from kvstrata.errors import (
    ChunkTooLargeError,
    InvalidArgumentError,
    StoreError,
    TierFullError,
    TierIOError,
    TransportError,
)
from kvstrata.kvstore.catalog import Catalog
from kvstrata.kvstore.eviction import make_policy
from kvstrata.kvstore.tier import Tier

__all__ = ["RemoteTier"]


class _Entry:
    __slots__ = ("meta", "pins", "size")

    def __init__(self, size: int, meta: ChunkMeta) -> None:
        self.size = size
        self.meta = meta
        self.pins = 0


class RemoteTier(Tier):
    """A quota of ``capacity_bytes`` on one or several cache servers (see the module docstring).

    ``client``: a :class:`kvstrata.client.Client`, or server URL(s) (the tier then owns and closes its
    client; ``token`` and ``timeout`` are passed on).
    """

    name = "remote"
    shared = True

    def __init__(
        self,
        client: Any,
        capacity_bytes: int,
        *,
        token: str | bytes | None = None,
        timeout: float | None = None,
        policy: str = "lru",
    ) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise InvalidArgumentError("a remote tier needs a positive capacity")
        if isinstance(client, (str, list, tuple)):
            from kvstrata.client import Client

            client = Client(client, token=token, timeout=timeout)
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        # get_meta is not answered from it (catalog_meta stays False): it holds only the chunks this
        # instance put, and the servers may hold others.
        self._catalog: Catalog[_Entry] = Catalog(
            self._lock, make_policy(policy), charge=lambda e: e.size, length=lambda e: e.size
        )
        self._used = 0
        self._reserved = 0
        self._closed = False

    # -- helpers -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the remote tier is closed")

    def _io_error(self, what: str, exc: TransportError) -> TierIOError:
        with self._lock:
            self._count("errors")
        return TierIOError(f"remote tier: {what} failed: {exc}")

    def _forget(self, key: bytes) -> _Entry | None:
        """Drop ``key`` from the catalog (lock held)."""
        entry = self._catalog.pop(key)
        if entry is not None:
            self._used -= entry.size
        return entry

    # -- the Tier contract ---------------------------------------------------------------------------
    def put(self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META, *, evict: bool = True) -> None:
        """Store a copy of ``data`` on the key's server, evicting (deleting) cold chunks if allowed."""
        key = check_key(key)
        src = as_byte_tensor(data)
        size = src.numel()
        if size > self._capacity:
            raise ChunkTooLargeError(f"a {size}-byte chunk exceeds the remote tier's {self._capacity} bytes")
        evicted: list[tuple[bytes, ChunkMeta]] = []
        with self._lock:
            self._check_open()
            old = self._catalog.get(key)
            if old is not None and not old.pins:
                # Being replaced: its quota is this put's to reuse (concurrent puts of the key each
                # reserve their own size, so the quota holds whatever the interleaving).
                self._forget(key)
            need = self._used + self._reserved + size
            if need > self._capacity:
                if not evict:
                    raise TierFullError("the remote tier's quota is full")
                over = need - self._capacity
                chosen, freed = self._catalog.coldest(over)
                if freed < over:
                    raise TierFullError("the remote tier is full and every chunk in it is pinned")
                for victim, entry in chosen:
                    self._forget(victim)
                    evicted.append((victim, entry.meta))
                    self._count("evictions")
            self._reserved += size
        try:
            if evicted:
                try:
                    self._client.delete([k for k, _ in evicted])
                except TransportError:
                    pass  # the chunks are gone from our quota; the server evicts strays itself
                self._emit_removed([k for k, _ in evicted], [m for _, m in evicted])
            try:
                self._client.put(key, src, meta)
            except TransportError as exc:
                raise self._io_error("put", exc) from exc
        except BaseException:
            with self._lock:
                self._reserved -= size
            raise
        with self._lock:
            self._reserved -= size
            if self._closed:
                raise StoreError("the remote tier is closed")
            self._forget(key)
            self._catalog.add(key, _Entry(size, meta), size)
            self._used += size
            self._count("puts")
            self._count("bytes_written", size)
        self._emit_stored([key], [meta])

    def _fetch(self, key: bytes, out: BufferLike | None) -> torch.Tensor | None:
        with self._lock:
            self._check_open()
        try:
            got: torch.Tensor | None = self._client.get(key, out=out)
        except TransportError as exc:
            raise self._io_error("get", exc) from exc
        lost: _Entry | None = None
        with self._lock:
            if got is None:
                self._count("misses")
                entry = self._catalog.get(key)
                if entry is not None and not entry.pins:
                    lost = self._forget(key)  # the server no longer has it
            else:
                self._count("hits")
                self._count("bytes_read", got.numel())
                if self._catalog.get(key) is not None:
                    self._catalog.touch(key)
        if lost is not None:
            self._emit_removed([key], [lost.meta])
        return got

    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """The chunk's bytes from its server (into ``out`` when given), or ``None`` on a miss."""
        return self._fetch(check_key(key), out)

    def acquire(self, key: bytes) -> ChunkHandle | None:
        """Fetch the chunk into a local tensor and keep its key out of eviction until released."""
        key = check_key(key)
        data = self._fetch(key, None)
        if data is None:
            return None
        with self._lock:
            entry = self._catalog.get(key)
            if entry is None:
                return ChunkHandle(key, data, EMPTY_META)
            entry.pins += 1
            meta = entry.meta

        def release() -> None:
            with self._lock:
                entry.pins -= 1

        return ChunkHandle(key, data, meta, release)

    def contains(self, key: bytes) -> bool:
        """Whether the catalog holds the chunk, else whether its server does (not an access)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if self._catalog.get(key) is not None:
                return True
        try:
            return bool(self._client.exists([key])[0])
        except TransportError:
            return False

    def remove(self, key: bytes) -> bool:
        """Delete the chunk from the catalog and from its server."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            entry = self._forget(key)
        try:
            removed = self._client.delete([key]) > 0
        except TransportError as exc:
            if entry is None:
                raise self._io_error("delete", exc) from exc
            removed = False
        if entry is not None:
            self._emit_removed([key], [entry.meta])
            return True
        if removed:
            self._emit_removed([key], [EMPTY_META])
        return removed

    def victims(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys of the catalog that free at least ``num_bytes``."""
        return self._catalog.victims(num_bytes)

    def keys(self) -> Iterator[bytes]:
        """A snapshot of the catalog's keys."""
        return self._catalog.keys()

    def size_of(self, key: bytes) -> int | None:
        """The chunk's size from the catalog, or ``None``."""
        return self._catalog.size_of(key)

    @property
    def capacity_bytes(self) -> int:
        """The tier's quota on the servers."""
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of the quota in use (including puts in flight)."""
        with self._lock:
            return self._used + self._reserved

    def __len__(self) -> int:
        return len(self._catalog)

    def close(self) -> None:
        """Stop serving calls; the chunks stay on the servers. Closes the client if the tier made it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_client:
            self._client.close()
