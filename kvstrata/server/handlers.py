"""The request handlers of the cache server: one coroutine per opcode, plus the Store calls they make.

Each handler reads (or skips) its request's payload through the :class:`ServerConnection` and sends
exactly one reply; a :class:`KVStrataError` it raises becomes a typed ERROR reply (see ``app.py``).
Store calls go through ``server.run_store`` (off the event loop when a disk tier may block).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvstrata.core.buffers import byte_view
from kvstrata.core.chunk import ChunkHandle, ChunkMeta
from kvstrata.errors import KVStrataError, ProtocolError
from kvstrata.kvstore.store import Store, StoreReservation
from kvstrata.server.connection import ServerConnection, ServerContext
from kvstrata.transport import protocol as p

__all__ = ["HANDLERS", "stats_payload"]


def _bytes_of(held: StoreReservation | ChunkHandle) -> memoryview:
    """The flat bytes of a reservation or a pinned chunk: the pool's own memoryview when it has one."""
    mem: memoryview | None = held.mem
    return mem if mem is not None else byte_view(held.data)


def _crc_of(handle: ChunkHandle, view: memoryview) -> int:
    """The chunk's CRC-32C: the one checked when it was put, else computed now."""
    crc = handle.meta.crc32c
    return crc if crc >= 0 else p.checksum(view)


# ---- handlers ---------------------------------------------------------------------------------------


async def _ping(conn: ServerConnection, header: p.Header, meta: Any) -> None:
    await conn.reply(p.Op.PING, header.request_id, p.Empty())


async def _receive_chunk(conn: ServerConnection, size: int, crc: int | None) -> torch.Tensor | None:
    """Read one chunk's payload into the connection's buffer; ``None`` if its checksum fails."""
    buf = conn.receive_buffer(size)
    view = byte_view(buf)
    await conn.read_payload_into(view)
    if crc is not None and p.checksum(view) != crc:
        return None
    return buf


def _reserve(store: Store, key: bytes, size: int, meta: ChunkMeta) -> StoreReservation | None:
    """A Store reservation for one chunk, or ``None`` (no room on top, a bad key): the caller then
    receives into the connection's buffer and puts (one copy more)."""
    try:
        return store.reserve(key, size, meta)
    except KVStrataError:
        return None


def _reserve_run(store: Store, items: Sequence[p.PutItem], verify: bool) -> list[StoreReservation]:
    """Reservations for the leading ``items`` (``Store.reserve_many``: it stops at the first that gets
    none, so that the chunks before it are committed before it is put: they may be what it has to evict).
    ``[]`` when none can be made: the caller then receives and puts chunk by chunk."""
    specs = [
        (item.key, item.size, p.chunk_meta(item.meta, item.checksum if verify else -1)) for item in items
    ]
    try:
        return store.reserve_many(specs)
    except KVStrataError:
        return []  # e.g. the store closed: the put path reports it


async def _reserved(conn: ServerConnection, fn: Any, *args: Any) -> Any:
    """``run_store(fn, ...)`` returning reservations: if this task is cancelled while a worker thread
    makes them, they are aborted when it is done (never leaked)."""
    server = conn.server
    if not server.offloads:
        return fn(*args)
    fut = asyncio.ensure_future(server.run_store(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_abort_result)
        raise


def _abort_result(fut: asyncio.Future[Any]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    result = fut.result()
    for res in result if isinstance(result, list) else [result]:
        if res is not None:
            res.abort()


def _commit_all(store: Store, reservations: Sequence[StoreReservation]) -> list[str]:
    """Commit the reservations still active, together (``Store.commit_many``: they come from its
    ``reserve_many``); their result codes ("" when stored, "corrupt" when aborted after a failed
    checksum)."""
    filled = [res.active for res in reservations]
    errors = iter(store.commit_many([res for res, ok in zip(reservations, filled, strict=True) if ok]))
    return [
        ("" if (err := next(errors)) is None else p.error_code(err)) if ok else "corrupt" for ok in filled
    ]


async def _put(conn: ServerConnection, header: p.Header, meta: p.PutRequest) -> None:
    crc = header.checksum if header.has_checksum else None
    chunk_meta = p.chunk_meta(meta.meta, -1 if crc is None else crc)
    res = await _reserved(conn, _reserve, conn.store, meta.key, header.payload_len, chunk_meta)
    if res is None:
        data = await _receive_chunk(conn, header.payload_len, crc)
        if data is None:
            await conn.error(header.request_id, "corrupt", "payload checksum mismatch; chunk not stored")
            return
        await conn.server.run_store(conn.store.put, meta.key, data, chunk_meta)
        await conn.reply(p.Op.PUT, header.request_id, p.Empty())
        return
    try:
        # The payload lands in the reserved slot itself; nothing is visible until the commit, and a
        # short read, a closed connection or a failed checksum aborts it (the finally below).
        view = _bytes_of(res)
        got = await conn.read_payload_many([view], crc is not None)
        if crc is not None and got[0] != crc:
            res.abort()
            await conn.error(header.request_id, "corrupt", "payload checksum mismatch; chunk not stored")
            return
        await conn.server.run_store(res.commit)
    finally:
        res.abort()  # a no-op once committed
    await conn.reply(p.Op.PUT, header.request_id, p.Empty())


async def _put_many(conn: ServerConnection, header: p.Header, meta: p.PutManyRequest) -> None:
    if sum(item.size for item in meta.items) != header.payload_len:
        raise ProtocolError("PUT_MANY item sizes do not add up to the payload length")
    items = meta.items
    verify = header.has_checksum
    budget = conn.server.max_inflight_bytes
    results: list[str] = []
    while len(results) < len(items):
        # The next run of chunks whose reserved slots stay within the connection's in-flight budget (at
        # least one chunk): reserved together, received in turn straight into their slots, committed.
        first = len(results)
        end, total = first, 0
        while end < len(items) and (end == first or total + items[end].size <= budget):
            total += items[end].size
            end += 1
        run: list[StoreReservation] = await _reserved(
            conn, _reserve_run, conn.store, items[first:end], verify
        )
        if not run:
            item = items[first]
            crc = item.checksum if verify else None
            data = await _receive_chunk(conn, item.size, crc)
            results.append(await conn.server.run_store(_store_one, conn.store, item, data, crc))
            continue
        try:
            views = [_bytes_of(res) for res in run]
            crcs = await conn.read_payload_many(views, verify)
            if verify:
                for item, res, crc in zip(items[first : first + len(run)], run, crcs, strict=True):
                    if crc != item.checksum:
                        res.abort()
            results.extend(await conn.server.run_store(_commit_all, conn.store, run))
        finally:
            for res in run:
                res.abort()  # a no-op for the committed ones
    await conn.reply(p.Op.PUT_MANY, header.request_id, p.PutManyReply(results=results))


def _store_one(store: Store, item: p.PutItem, data: torch.Tensor | None, crc: int | None) -> str:
    """Store one chunk of a PUT_MANY; its result code ("" when stored)."""
    if data is None:
        return "corrupt"
    try:
        store.put(item.key, data, p.chunk_meta(item.meta, -1 if crc is None else crc))
    except KVStrataError as exc:
        return p.error_code(exc)
    return ""


def _acquire(conn: ServerConnection, key: bytes) -> ChunkHandle | None:
    return _on_host(conn.store.acquire(key))


def _on_host(handle: ChunkHandle | None) -> ChunkHandle | None:
    """``handle`` itself, or for a device-tier hit a host copy of its bytes (tcp sends from host memory)."""
    if handle is not None and handle.mem is None and not handle.data.is_cpu:
        # A device-tier hit: tcp sends from host memory (one copy out of the GPU).
        host = handle.data.cpu()
        handle.release()
        handle = ChunkHandle(handle.key, host, handle.meta)
    return handle


async def _get(conn: ServerConnection, header: p.Header, meta: p.KeyRequest) -> None:
    handle = await conn.server.run_store(_acquire, conn, meta.key)
    if handle is None:
        await conn.reply(p.Op.GET, header.request_id, p.GetReply(found=False))
        return
    try:  # the chunk stays pinned until its bytes are out
        view = _bytes_of(handle)
        crc = _crc_of(handle, view) if header.has_checksum else None
        reply = p.GetReply(found=True, meta=p.wire_meta(handle.meta))
        await conn.reply(p.Op.GET, header.request_id, reply, [view], checksum=crc)
    finally:
        handle.release()


async def _get_many(conn: ServerConnection, header: p.Header, meta: p.KeysRequest) -> None:
    budget = min(conn.server.max_payload, conn.server.max_inflight_bytes)
    want_crc = header.has_checksum
    handles, sizes, crcs, views = await conn.server.run_store(_collect, conn, meta.keys, budget, want_crc)
    try:  # the chunks stay pinned until their bytes are out
        reply = p.GetManyReply(sizes=sizes, checksums=crcs if want_crc else [])
        flags = p.Flag.CHECKSUM if want_crc else 0
        await conn.reply(p.Op.GET_MANY, header.request_id, reply, views, flags=flags)
    finally:
        for handle in handles:
            handle.release()


def _collect(
    conn: ServerConnection, keys: Sequence[bytes], budget: int, want_crc: bool
) -> tuple[list[ChunkHandle], list[int], list[int], list[memoryview]]:
    """Pin the chunks of a GET_MANY up to ``budget`` bytes (the rest are deferred, -2; misses -1)."""
    handles: list[ChunkHandle] = []
    sizes: list[int] = []
    crcs: list[int] = []
    views: list[memoryview] = []
    found = conn.store.acquire_many(keys, budget)
    try:
        for i, handle in enumerate(found):
            # A device-tier hit becomes a host copy; should that copy fail, the original is still in
            # ``found`` and is released below with the rest.
            handle = found[i] = _on_host(handle)
            if handle is None:
                sizes.append(-1)
                crcs.append(0)
                continue
            view = _bytes_of(handle)
            handles.append(handle)
            views.append(view)
            sizes.append(len(view))
            crcs.append(_crc_of(handle, view) if want_crc else 0)
    except BaseException:
        for handle in found:
            if handle is not None:
                handle.release()
        raise
    deferred = len(keys) - len(found)  # over the budget: the client asks for them again
    sizes += [-2] * deferred
    crcs += [0] * deferred
    return handles, sizes, crcs, views


async def _exists(conn: ServerConnection, header: p.Header, meta: p.KeysRequest) -> None:
    present = [conn.store.contains(k) for k in meta.keys]
    await conn.reply(p.Op.EXISTS, header.request_id, p.ExistsReply(present=present))


async def _lookup_prefix(conn: ServerConnection, header: p.Header, meta: p.KeysRequest) -> None:
    found = conn.store.lookup_prefix(meta.keys)
    reply = p.LookupReply(num_chunks=found.num_chunks, tiers=list(found.tiers))
    await conn.reply(p.Op.LOOKUP_PREFIX, header.request_id, reply)


async def _delete(conn: ServerConnection, header: p.Header, meta: p.KeysRequest) -> None:
    removed = [bool(conn.store.remove(k)) for k in meta.keys]
    await conn.reply(p.Op.DELETE, header.request_id, p.DeleteReply(removed=removed))


def stats_payload(server: ServerContext) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Per-tier counters and server counters (shared by STATS and the admin API)."""
    tiers: Mapping[str, Any] = server.store.stats()
    out = {
        name: {k: int(v) for k, v in vars(snap).items()} if hasattr(snap, "__dict__") else _slots(snap)
        for name, snap in tiers.items()
    }
    counters = dict(server.counters)
    counters["uptime_s"] = int(time.time() - server.started_at)
    return out, counters


def _slots(obj: Any) -> dict[str, int]:
    return {name: int(getattr(obj, name)) for name in getattr(obj, "__slots__", ())}


async def _stats(conn: ServerConnection, header: p.Header, meta: Any) -> None:
    tiers, counters = stats_payload(conn.server)
    await conn.reply(p.Op.STATS, header.request_id, p.StatsReply(tiers=tiers, server=counters))


#: opcode -> handler of the core protocol (transport extensions add theirs).
HANDLERS: Mapping[int, Any] = {
    p.Op.PING: _ping,
    p.Op.PUT: _put,
    p.Op.PUT_MANY: _put_many,
    p.Op.GET: _get,
    p.Op.GET_MANY: _get_many,
    p.Op.EXISTS: _exists,
    p.Op.LOOKUP_PREFIX: _lookup_prefix,
    p.Op.DELETE: _delete,
    p.Op.STATS: _stats,
}
