"""Eviction policies: which chunk a full tier drops first. LRU by default, S3-FIFO as an option.

Call order (by the owning tier, always under the tier's own lock — policies are not thread-safe):

- ``insert(key, size)`` when a chunk is stored (inserting a present key updates its size and counts as an
  access), ``touch(key)`` on a hit, ``remove(key)`` when the chunk leaves the tier for any reason (no error
  if absent).
- ``candidates()`` yields the stored keys coldest first. The tier skips the pinned ones itself and stops
  as soon as it has freed enough. The iterator stays valid while the tier calls ``remove()`` on keys it has
  yielded, so a tier may evict as it iterates; any other change to the policy while an iterator is open
  may end that iterator early (never yield a key that is absent). A yielded key that is not removed stays
  where it was: the next ``candidates()`` yields it first again.

Both policies keep intrusive doubly-linked lists, so every operation is O(1) (``candidates`` is O(1) per
key yielded, amortised) and nothing is copied per call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator

from kvstrata.errors import ConfigError

__all__ = ["POLICIES", "EvictionPolicy", "LRUPolicy", "S3FIFOPolicy", "make_policy"]


class EvictionPolicy(ABC):
    """Orders keys for eviction. Not thread-safe: the owning tier calls it under its own lock."""

    @abstractmethod
    def insert(self, key: bytes, size: int) -> None:
        """A new key was stored (``size`` in bytes); a present key is updated and counts as an access."""

    @abstractmethod
    def touch(self, key: bytes) -> None:
        """The key was read (a hit); unknown keys are ignored."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """The key left the tier (no error if absent)."""

    @abstractmethod
    def candidates(self) -> Iterator[bytes]:
        """Keys in eviction order, coldest first; the tier skips pinned ones itself."""

    @abstractmethod
    def __len__(self) -> int:
        """Keys tracked."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether the key is tracked."""


class _Node:
    """One key in an intrusive list. A removed node keeps its ``next`` so open iterators can step on."""

    __slots__ = ("freq", "key", "live", "next", "prev", "queue", "size")

    def __init__(self, key: bytes, size: int, queue: int) -> None:
        self.key = key
        self.size = size
        self.queue = queue
        self.freq = 0
        self.live = True
        self.prev: _Node | None = None
        self.next: _Node | None = None


class _List:
    """A doubly-linked list with a sentinel; head side is the eviction end."""

    __slots__ = ("bytes", "count", "sentinel")

    def __init__(self) -> None:
        self.sentinel = _Node(b"", 0, -1)
        self.sentinel.prev = self.sentinel
        self.sentinel.next = self.sentinel
        self.bytes = 0
        self.count = 0

    def append(self, node: _Node) -> None:
        tail = self.sentinel.prev
        assert tail is not None
        node.prev = tail
        node.next = self.sentinel
        tail.next = node
        self.sentinel.prev = node
        self.bytes += node.size
        self.count += 1

    def unlink(self, node: _Node) -> None:
        # node.next is left as it was: an iterator parked on this node follows it to the successor.
        prev, nxt = node.prev, node.next
        assert prev is not None and nxt is not None
        prev.next = nxt
        nxt.prev = prev
        self.bytes -= node.size
        self.count -= 1

    def first(self) -> _Node | None:
        node = self.sentinel.next
        return None if node is self.sentinel else node

    def step(self, node: _Node) -> _Node | None:
        """The live successor of ``node`` (which may have been unlinked since), or ``None`` at the end."""
        nxt = node.next
        while nxt is not None and nxt is not self.sentinel and not nxt.live:
            nxt = nxt.next
        if nxt is None or nxt is self.sentinel:
            return None
        return nxt


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._nodes: dict[bytes, _Node] = {}
        self._list = _List()

    def insert(self, key: bytes, size: int) -> None:
        """Store ``key`` as the most recently used."""
        node = self._nodes.get(key)
        if node is not None:
            self._list.unlink(node)
            node.size = size
            self._list.append(node)
            return
        node = _Node(key, size, 0)
        self._nodes[key] = node
        self._list.append(node)

    def touch(self, key: bytes) -> None:
        """Make ``key`` the most recently used."""
        node = self._nodes.get(key)
        if node is not None:
            self._list.unlink(node)
            self._list.append(node)

    def remove(self, key: bytes) -> None:
        """Forget ``key``."""
        node = self._nodes.pop(key, None)
        if node is not None:
            self._list.unlink(node)
            node.live = False

    def candidates(self) -> Iterator[bytes]:
        """Least recently used first."""
        node = self._list.first()
        while node is not None:
            yield node.key
            node = self._list.step(node)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes


_SMALL, _MAIN = 0, 1
_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small FIFO, a main FIFO with frequency bits, a ghost FIFO.

    New keys enter the small queue (about ``small_fraction`` of the bytes). A key leaving the small queue
    unread is evicted (and remembered in the ghost queue); one read there moves to the main queue. Keys in
    the main queue are reinserted while their frequency (0-3, bumped per read) is above zero. A key found
    in the ghost queue on insert goes straight to the main queue. Scans and one-hit chunks thus never push
    out the reused working set, which LRU lets them do.
    """

    def __init__(self, small_fraction: float = 0.1, min_ghost: int = 64) -> None:
        if not 0.0 < small_fraction < 1.0:
            raise ConfigError(f"S3-FIFO small_fraction must be in (0, 1), got {small_fraction}")
        self._fraction = small_fraction
        self._min_ghost = min_ghost
        self._nodes: dict[bytes, _Node] = {}
        self._queues = (_List(), _List())
        self._ghost: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, size: int) -> None:
        """Store ``key``: into the main queue if it was recently evicted, else into the small one."""
        node = self._nodes.get(key)
        if node is not None:
            queue = self._queues[node.queue]
            queue.unlink(node)
            node.size = size
            queue.append(node)
            node.freq = min(node.freq + 1, _MAX_FREQ)
            return
        target = _SMALL
        if key in self._ghost:
            del self._ghost[key]
            target = _MAIN
        node = _Node(key, size, target)
        self._nodes[key] = node
        self._queues[target].append(node)

    def touch(self, key: bytes) -> None:
        """Count a read of ``key`` (saturating at 3)."""
        node = self._nodes.get(key)
        if node is not None and node.freq < _MAX_FREQ:
            node.freq += 1

    def remove(self, key: bytes) -> None:
        """Forget ``key``; a key leaving the small queue is remembered in the ghost queue."""
        node = self._nodes.pop(key, None)
        if node is None:
            return
        self._queues[node.queue].unlink(node)
        node.live = False
        if node.queue == _SMALL:
            self._ghost[key] = None
            limit = max(self._min_ghost, len(self._nodes))
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)

    def _move_to_main(self, node: _Node) -> None:
        self._queues[_SMALL].unlink(node)
        node.queue = _MAIN
        node.freq = 0
        self._queues[_MAIN].append(node)

    def _reinsert_main(self, node: _Node) -> None:
        main = self._queues[_MAIN]
        main.unlink(node)
        node.freq -= 1
        main.append(node)

    def candidates(self) -> Iterator[bytes]:
        """Keys in S3-FIFO eviction order; read keys are moved/reinserted on the way, as S3-FIFO does."""
        small, main = self._queues
        cursors: list[_Node | None] = [small.first(), main.first()]
        # bytes of keys yielded but not removed: they are passed over, not counted as still queued
        held = [0, 0]
        while cursors[_SMALL] is not None or cursors[_MAIN] is not None:
            small_left = small.bytes - held[_SMALL]
            total_left = small_left + main.bytes - held[_MAIN]
            use_small = cursors[_SMALL] is not None and (
                cursors[_MAIN] is None or small_left >= self._fraction * total_left
            )
            which = _SMALL if use_small else _MAIN
            node = cursors[which]
            assert node is not None
            queue = self._queues[which]
            nxt = queue.step(node)
            if node.freq > 0:
                # A read key is spared: it moves to (or goes round) the main queue.
                if which == _SMALL:
                    self._move_to_main(node)
                    if cursors[_MAIN] is None:
                        cursors[_MAIN] = node
                else:
                    self._reinsert_main(node)
                    if nxt is None:
                        nxt = node
                cursors[which] = nxt
                continue
            yield node.key
            if node.live:
                held[which] += node.size
                nxt = queue.step(node)
            else:
                # re-read the successor: the list changed when the node was unlinked
                nxt = queue.step(node)
            cursors[which] = nxt

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes


#: Policy names accepted by :func:`make_policy`.
POLICIES = ("lru", "s3fifo")


def make_policy(name: str = "lru") -> EvictionPolicy:
    """A new policy by name: ``"lru"`` (default) or ``"s3fifo"``; :class:`ConfigError` otherwise."""
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    raise ConfigError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}")
