"""shm/nixl put leases write straight into slots reserved in the host pool (LeaseServer with a Store):
invisible until PUT_COMMIT, committed in place, aborted when the lease expires and its owner goes away."""

from __future__ import annotations

import os
import time

import torch

from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.server import lease as lease_server
from kvstrata.transport import lease as ls
from tests.transport.test_shm import _lease_server

SLOT = 4096


def make(pool_slots: int = 4, staging_slots: int = 2) -> tuple[Store, torch.Tensor, lease_server.LeaseServer]:
    pool = pool_slots * SLOT
    seg = torch.zeros(pool + staging_slots * SLOT, dtype=torch.uint8)
    store = Store([HostTier(pool, SLOT, buffer=seg[:pool])])
    return store, seg, _lease_server(store, seg, pool)


def test_put_lease_is_a_reserved_pool_slot_committed_in_place() -> None:
    store, seg, leases = make()
    try:
        key = os.urandom(16)
        begin = leases.put_begin(1, [SLOT], store)
        (lease,), (position,) = begin.leases, begin.positions
        assert lease and 0 <= position < 4 * SLOT, "the put lease is not a pool slot"
        assert leases.staging.free_slots == 2 and leases.reserved_puts == 1
        assert store.tiers[0].used_bytes == SLOT
        seg[position : position + SLOT].fill_(9)
        assert store.get(key) is None and len(store.tiers[0]) == 0, "visible before PUT_COMMIT"
        meta = ls.p.WireMeta(num_tokens=16)
        done = leases.put_commit(1, store, [ls.PutCommitItem(lease=lease, key=key, size=SLOT, meta=meta)])
        assert done.results == [""] and leases.active == 0 and leases.reserved_puts == 0
        assert store.tiers[0].slot_span(key) == (position, SLOT), "the chunk was copied, not committed"  # type: ignore[attr-defined]
        got = store.get(key)
        assert got is not None and bool((got == 9).all())
        assert store.get_meta(key) is not None and store.get_meta(key).num_tokens == 16  # type: ignore[union-attr]
        assert store.tiers[0].used_bytes == SLOT
        # Written shorter than leased: the bytes written are stored, the reservation freed.
        begin = leases.put_begin(1, [SLOT], store)
        seg[begin.positions[0] : begin.positions[0] + 100].fill_(5)
        short = [ls.PutCommitItem(lease=begin.leases[0], key=key, size=100)]
        assert leases.put_commit(1, store, short).results == [""]
        got = store.get(key)
        assert got is not None and got.numel() == 100 and bool((got == 5).all())
        assert store.tiers[0].used_bytes == 128  # one 128-byte class slot: the reservation was freed
    finally:
        store.close()


def test_expired_and_abandoned_put_reservations_never_become_visible() -> None:
    store, seg, leases = make()
    try:
        keys = [os.urandom(16) for _ in range(2)]
        begin = leases.put_begin(5, [SLOT, SLOT], store)
        assert all(begin.leases) and store.tiers[0].used_bytes == 2 * SLOT
        for pos in begin.positions:
            seg[pos : pos + SLOT].fill_(1)
        leases.reap(now=time.monotonic() + 31)
        # Quarantined: the client may still write, so the slots stay held, and commits are refused.
        assert store.tiers[0].used_bytes == 2 * SLOT
        items = [ls.PutCommitItem(lease=begin.leases[0], key=keys[0], size=SLOT)]
        assert leases.put_commit(5, store, items).results == ["busy"]
        leases.owner_closed(5)
        assert store.tiers[0].used_bytes == 0 and len(store.tiers[0]) == 0
        assert not any(store.contains(k) for k in keys)
        # A connection that closes with uncommitted put leases: aborted at once.
        begin = leases.put_begin(6, [SLOT], store)
        assert store.tiers[0].used_bytes == SLOT
        leases.owner_closed(6)
        assert store.tiers[0].used_bytes == 0 and leases.reserved_puts == 0 and leases.active == 0
    finally:
        store.close()


def test_reservations_are_bounded_then_staging_then_none() -> None:
    store, _, leases = make(pool_slots=8, staging_slots=2)
    try:
        begin = leases.put_begin(1, [SLOT] * 5, store)
        pool = 8 * SLOT
        in_pool = [pos for pos in begin.positions if 0 <= pos < pool]
        staged = [pos for pos in begin.positions if pos >= pool]
        # Reservations up to the staging slot count, then the staging slots, then no lease.
        assert len(in_pool) == 2 and len(staged) == 2 and begin.leases[4] == 0
        assert store.tiers[0].used_bytes == 2 * SLOT
        leases.owner_closed(1)
        assert store.tiers[0].used_bytes == 0 and leases.staging.free_slots == 2
    finally:
        store.close()


def _shared_pool(pool_slots: int, staging_slots: int) -> tuple[Store, lease_server.LeaseServer, int, int]:
    """A Store whose host pool is the head of one segment, and a LeaseServer bounded by
    :func:`reservation_bound`, as the shm extension builds them; returns (store, leases, pool, bound)."""
    pool = pool_slots * SLOT
    seg = torch.zeros(pool + staging_slots * SLOT, dtype=torch.uint8)
    store = Store([HostTier(pool, SLOT, buffer=seg[:pool])])
    base = seg.data_ptr()

    def locate(t: torch.Tensor) -> int | None:
        off = t.data_ptr() - base
        return off if off >= 0 and off + t.numel() <= pool else None

    bound = lease_server.reservation_bound(pool, SLOT, staging_slots)
    staging = lease_server.StagingPool(seg[pool:], SLOT)
    leases = lease_server.LeaseServer(
        0x40, staging, locate, lambda slot: pool + slot * SLOT, max_reserved_bytes=bound
    )
    return store, leases, pool, bound


def test_reservations_up_to_the_given_bound_and_past_a_chunk_too_large() -> None:
    staging_slots = 2
    store, leases, pool, bound = _shared_pool(8, staging_slots)
    staging = leases.staging
    assert (
        bound == 4 * SLOT
        and lease_server.reservation_bound(2 * SLOT, SLOT, staging_slots) == staging_slots * SLOT
    )
    try:
        # A chunk larger than a slot gets nothing; reserving goes on after it.
        begin = leases.put_begin(1, [SLOT, 2 * SLOT, SLOT, SLOT, SLOT, SLOT, SLOT, SLOT], store)
        where = ["pool" if 0 <= p < pool else "staging" if p >= pool else "none" for p in begin.positions]
        assert where == ["pool", "none", "pool", "pool", "pool", "staging", "staging", "none"]
        assert leases.reserved_puts == 4 and leases.reserved_bytes == bound
        assert store.tiers[0].used_bytes == bound
        keys = [os.urandom(16) for _ in begin.leases]
        items = [
            ls.PutCommitItem(lease=lease, key=key, size=SLOT)
            for lease, key in zip(begin.leases, keys, strict=True)
            if lease
        ]
        assert leases.put_commit(1, store, items).results == [""] * 6
        assert leases.reserved_puts == 0 and leases.active == 0 and staging.free_slots == staging_slots
        assert leases.reserved_bytes == 0
        assert [store.contains(k) for k in keys] == [True, False, True, True, True, True, True, False]
    finally:
        store.close()


def test_the_reservation_bound_counts_bytes_so_small_chunks_are_written_in_place() -> None:
    # Half of a pool of 8 slots is 4 slots' bytes: 16 chunks of a quarter slot each, then staging.
    store, leases, pool, bound = _shared_pool(8, 2)
    quarter = SLOT // 4
    try:
        begin = leases.put_begin(1, [quarter] * 18, store)
        in_pool = [0 <= p < pool for p in begin.positions]
        assert in_pool == [True] * 16 + [False] * 2 and all(p >= pool for p in begin.positions[16:])
        assert leases.reserved_puts == 16 and leases.reserved_bytes == bound
        # Ending one reservation frees its bytes for the next PUT_BEGIN.
        first = ls.PutCommitItem(lease=begin.leases[0], key=os.urandom(16), size=quarter)
        assert leases.put_commit(1, store, [first]).results == [""]
        assert leases.reserved_bytes == bound - quarter
        again = leases.put_begin(1, [quarter, quarter], store)
        assert [0 <= p < pool for p in again.positions] == [True, False]
        assert leases.reserved_bytes == bound
    finally:
        store.close()
