"""The embedded, in-process block index (backend ``"memory"``).

Compact representation: each instance epoch owns a *slot* (a small integer) and a block's entry is one
Python int with 5 bits per slot: bit ``5 * slot`` says the slot holds the block in some tier, bits
``5 * slot + 1 + t`` say it holds it in tier ``t``. A lookup walks the prompt's keys once with a *want* mask
(the bits of the live slots whose prefix, or tier prefix, is still unbroken); the common step, where no
prefix ends at this block, is one dict probe, one AND and one compare, whatever the number of instances.
Masks are interned (one int object per distinct holder set), so entries of blocks with the same holders
share one object, and a lookup skips a run of such blocks with an identity test.

``clear(instance)`` retires the instance's slot (O(1)): its bits stay in the entries but no longer count,
because lookups only want live slots. Retired slots are reclaimed in one sweep when the slots run out, so a
slot is never reused while stale bits of it remain.

The number of entries is bounded by ``IndexConfig.max_blocks`` with a two-generation LRU: entries live in a
*young* and an *old* dict of at most ``max_blocks / 2`` entries each; writes and lookup hits move an entry
into the young one, and when it is full the old generation is dropped and the young one becomes old. That
evicts exactly the entries untouched for a whole generation, costs nothing per hit in the young generation
(an exact LRU list would cost a relink per block per lookup), and keeps the lookup loop a plain dict probe.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvstrata.errors import BlockIndexError
from kvstrata.index.base import (
    TIERS,
    BlockIndex,
    IndexStats,
    InstanceInfo,
    InstanceMatch,
    LookupResult,
    check_block_keys,
    check_instance,
    tier_index,
)

if TYPE_CHECKING:
    from kvstrata.config import IndexConfig

__all__ = ["MemoryBlockIndex"]

log = logging.getLogger(__name__)

_W = 1 + len(TIERS)  # bits per slot: "any tier", then one per tier
_SLOT_BITS = (1 << _W) - 1
_MAX_INTERNED = 1 << 16
_NOTHING = object()


def _expand(slot_mask: int) -> int:
    """Spread a slot bitmask to the entry bit space (all 5 bits of each slot set)."""
    out = 0
    while slot_mask:
        low = slot_mask & -slot_mask
        out |= _SLOT_BITS << ((low.bit_length() - 1) * _W)
        slot_mask ^= low
    return out


class _Instance:
    __slots__ = ("epoch", "expires", "slot")

    def __init__(self) -> None:
        self.epoch = 0
        self.slot: int | None = None
        self.expires = 0.0


class MemoryBlockIndex(BlockIndex):
    """The in-process index: slot bitmasks per block, bounded by a two-generation LRU.

    ``clock`` (seconds, monotonic) is injectable so that lease expiry can be tested without sleeping.
    """

    def __init__(
        self,
        config: IndexConfig | None = None,
        *,
        max_blocks: int | None = None,
        max_instances: int | None = None,
        lease_ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if config is None:
            from kvstrata.config import IndexConfig

            config = IndexConfig()
        self._max_blocks = max(2, max_blocks if max_blocks is not None else config.max_blocks)
        self._generation = self._max_blocks // 2
        self._max_slots = max(1, max_instances if max_instances is not None else config.max_instances)
        self._ttl = lease_ttl_s if lease_ttl_s is not None else config.lease_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._young: dict[bytes, int] = {}
        self._interned: dict[int, int] = {}
        self._old: dict[bytes, int] = {}
        self._instances: dict[str, _Instance] = {}
        self._slot_owner: dict[int, str] = {}
        self._free: list[int] = list(range(self._max_slots))  # a heap: low slots first keeps ints small
        self._retired = 0  # slot mask of cleared epochs whose bits may remain in entries
        # cache of the live want-mask, valid until a lease changes or the earliest live lease expires
        self._live_version = -1
        self._version = 0
        self._live_until = 0.0
        self._live_want = 0

    # -- instances and slots ------------------------------------------------------------------------
    def _renew(self, instance: str, ttl_s: float | None = None) -> _Instance:
        now = self._clock()
        inst = self._instances.get(instance)
        if inst is None:
            inst = self._instances[instance] = _Instance()
        if inst.expires <= now or ttl_s is not None:
            self._version += 1
        inst.expires = now + (self._ttl if ttl_s is None else ttl_s)
        return inst

    def _slot_of(self, instance: str, inst: _Instance) -> int:
        if inst.slot is not None:
            return inst.slot
        if not self._free:
            self._reclaim()
        if not self._free:
            raise BlockIndexError(f"the memory index tracks {self._max_slots} instances and all are live")
        slot = heapq.heappop(self._free)
        inst.slot = slot
        self._slot_owner[slot] = instance
        self._version += 1
        return slot

    def _reclaim(self) -> None:
        """Free slots: forget instances whose lease ran out, then sweep retired bits out of every entry."""
        now = self._clock()
        for name, inst in list(self._instances.items()):
            if inst.expires <= now and inst.slot is not None:
                self._retired |= 1 << inst.slot
                del self._slot_owner[inst.slot]
                del self._instances[name]
        if not self._retired:
            return
        keep = ~_expand(self._retired)
        dropped = 0
        for gen in (self._young, self._old):
            dead = []
            for key, value in gen.items():
                value &= keep
                if value:
                    gen[key] = self._intern(value)
                else:
                    dead.append(key)
            for key in dead:
                del gen[key]
            dropped += len(dead)
        slots = self._retired
        while slots:
            low = slots & -slots
            heapq.heappush(self._free, low.bit_length() - 1)
            slots ^= low
        self._retired = 0
        self._version += 1
        log.info("memory index: reclaimed slots, dropped %d stale entries", dropped)

    def _want(self) -> int:
        now = self._clock()
        if self._live_version != self._version or now >= self._live_until:
            slots = 0
            until = float("inf")
            for inst in self._instances.values():
                if inst.slot is not None and inst.expires > now:
                    slots |= 1 << inst.slot
                    until = min(until, inst.expires)
            self._live_want = _expand(slots)
            self._live_until = until
            self._live_version = self._version
        return self._live_want

    def _intern(self, value: int) -> int:
        """One shared int object per distinct mask: compact, and lets lookups skip runs by identity."""
        shared = self._interned.setdefault(value, value)
        if len(self._interned) > _MAX_INTERNED:
            self._interned = {value: shared}  # entries keep their objects; only new sharing restarts
        return shared

    def _rotate_if_full(self) -> None:
        if len(self._young) >= self._generation:
            self.stats.evictions += len(self._old)
            self._old = self._young
            self._young = {}

    # -- writes -------------------------------------------------------------------------------------
    def add(self, instance: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that ``instance`` holds ``keys`` in ``tier``."""
        check_instance(instance)
        t = tier_index(tier)
        keys = check_block_keys(keys)
        with self._lock:
            self._check_open()
            inst = self._renew(instance)
            slot = self._slot_of(instance, inst)
            bits = (1 << (slot * _W)) | (1 << (slot * _W + 1 + t))
            young = self._young
            old_pop = self._old.pop
            generation = self._generation
            share = self._interned.setdefault
            for key in keys:
                value = young.get(key)
                if value is None:
                    value = old_pop(key, 0)
                    if len(young) >= generation:
                        self._rotate_if_full()
                        young = self._young
                        old_pop = self._old.pop
                value |= bits
                young[key] = share(value, value)
            if len(self._interned) > _MAX_INTERNED:
                self._interned = {}  # entries keep their objects; only new sharing starts over
            self.stats.blocks_added += len(keys)

    def remove(self, instance: str, tier: str, keys: Sequence[bytes]) -> None:
        """Record that ``instance`` no longer holds ``keys`` in ``tier``."""
        check_instance(instance)
        t = tier_index(tier)
        keys = check_block_keys(keys)
        with self._lock:
            self._check_open()
            inst = self._renew(instance)
            if inst.slot is None:
                return
            base = inst.slot * _W
            tier_bit = 1 << (base + 1 + t)
            any_bit = 1 << base
            slot_tiers = (_SLOT_BITS - 1) << base
            for key in keys:
                for gen in (self._young, self._old):
                    value = gen.get(key)
                    if value is None:
                        continue
                    value &= ~tier_bit
                    if not value & slot_tiers:
                        value &= ~any_bit
                    if value:
                        gen[key] = self._intern(value)
                    else:
                        del gen[key]
                    break
            self.stats.blocks_removed += len(keys)

    def clear(self, instance: str) -> None:
        """Forget everything ``instance`` holds: retire its slot (O(1))."""
        check_instance(instance)
        with self._lock:
            self._check_open()
            inst = self._renew(instance)
            inst.epoch += 1
            if inst.slot is not None:
                self._retired |= 1 << inst.slot
                del self._slot_owner[inst.slot]
                inst.slot = None
                self._version += 1
            self.stats.clears += 1

    def heartbeat(self, instance: str, ttl_s: float | None = None) -> None:
        """Renew the lease of ``instance``."""
        check_instance(instance)
        with self._lock:
            self._check_open()
            self._renew(instance, ttl_s)

    # -- reads --------------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """Per live instance, its longest consecutive prefix of ``keys`` and its depth per tier."""
        n = len(keys)
        with self._lock:
            self._check_open()
            self.stats.lookups += 1
            want = self._want()
            if not want or not n:
                return LookupResult(n)
            get = self._young.get
            ended_at: list[tuple[int, int]] = []  # (bits that ended, at block)
            i = 0
            prev: object = _NOTHING
            for key in keys:
                value = get(key)
                if value is prev:
                    # the same (interned) holders as the block before, the common case in a shared prefix:
                    # nothing can end here
                    i += 1
                    continue
                if value is None:
                    value = self._old.pop(key, None)
                    if value is None:
                        break
                    self._young[key] = value  # a hit promotes the entry to the young generation
                if value & want != want:
                    ended = want & ~value
                    want ^= ended
                    if i:
                        ended_at.append((ended, i))
                    if not want:
                        break
                prev = value
                i += 1
            if want and i:
                ended_at.append((want, i))
            self._rotate_if_full()
            prefix: dict[int, int] = {}
            depth: dict[int, dict[str, int]] = {}
            for ended, at in ended_at:
                while ended:
                    low = ended & -ended
                    slot, t = divmod(low.bit_length() - 1, _W)
                    if t:
                        depth.setdefault(slot, {})[TIERS[t - 1]] = at
                    else:
                        prefix[slot] = at
                    ended ^= low
            owners = self._slot_owner
            matches: dict[str, InstanceMatch] = {}
            for slot, blocks in prefix.items():
                name = owners[slot]
                matches[name] = InstanceMatch(name, blocks, depth.get(slot, {}))
            return LookupResult(n, matches)

    def instances(self) -> list[InstanceInfo]:
        """The live instances, sorted by name."""
        with self._lock:
            self._check_open()
            now = self._clock()
            return [
                InstanceInfo(name, inst.epoch, inst.expires - now)
                for name, inst in sorted(self._instances.items())
                if inst.expires > now
            ]

    def snapshot_stats(self) -> IndexStats:
        """Counters plus the number of entries held."""
        with self._lock:
            s = self.stats
            return IndexStats(
                lookups=s.lookups,
                blocks_added=s.blocks_added,
                blocks_removed=s.blocks_removed,
                clears=s.clears,
                errors=s.errors,
                dropped_writes=s.dropped_writes,
                buffered=0,
                evictions=s.evictions,
                entries=len(self._young) + len(self._old),
            )

    def __len__(self) -> int:
        """Entries held (including stale ones not yet reclaimed)."""
        return len(self._young) + len(self._old)
