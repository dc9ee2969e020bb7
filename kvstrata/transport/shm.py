"""The shm transport (``kvs+shm://``): same-host clients copy straight out of the server's host pool.

The server's host tier is carved from one POSIX shared-memory segment (``/dev/shm``, created ``0600`` by the
server's user, followed by a few staging slots). A local client connects over the usual kvs control
connection (HELLO, auth), then asks for the segment's name with ``SHM_ATTACH`` — the name is never in the
pre-auth greeting — and maps it. Gets and puts then follow :mod:`kvstrata.transport.lease`: the server pins
the chunk and returns its offset, the client copies straight between its tensor and the mapping (host
tensors: memmoves shared by the calling thread and helper threads, see :class:`HostCopier`; device
tensors: ``copy_``) and releases the lease; a put is
written straight into a slot reserved in the host pool (``Store.reserve``) and committed in place, with no
server-side copy; only when no pool slot can be reserved does it go through a staging slot (one copy).

Opcodes (see ``docs/protocol.md``, "shm"): ``0x40`` SHM_ATTACH, ``0x41`` LEASE_GET, ``0x42`` RELEASE,
``0x43`` PUT_BEGIN, ``0x44`` PUT_COMMIT.

Trust model: every process of the server's user that knows the token can map the segment read-write; the
0600 mode keeps other users out. Leases protect readers from slot reuse, not from a hostile local writer.
A server killed with SIGKILL cannot unlink its segment; the next server started by the same user removes
segments whose owning process is gone.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import mmap
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, cast

import msgspec
import torch

from kvstrata.errors import ConfigError, ConnectError, ProtocolError, RemoteError
from kvstrata.transport import lease as ls
from kvstrata.transport import protocol as p
from kvstrata.transport.base import ServerExtension
from kvstrata.transport.protocol import Header

__all__ = [
    "MAX_SEGMENT_BYTES",
    "SHM_BASE",
    "HostCopier",
    "SharedSegment",
    "ShmAttachReply",
    "ShmServerExtension",
    "ShmTransport",
]

log = logging.getLogger(__name__)

SHM_BASE = 0x40
#: Staging slots in the segment (puts, and gets of chunks held outside the host pool).
STAGING_SLOTS = 32
SHM_DIR = "/dev/shm"  # noqa: S108 - the POSIX shared-memory mount, not a temporary file
_PREFIX = "kvstrata-shm-"
_NAME = re.compile(r"^kvstrata-shm-(\d+)-[0-9a-f]{16}$")


class ShmAttachRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """SHM_ATTACH: no fields."""


#: Bound on a segment's size in an SHM_ATTACH reply. Not a payload size: the host pool is sized from the
#: machine's RAM and is often larger than the largest frame (4 GiB). Mapping it reserves address space
#: only; the client checks that the file has exactly this size before mapping it.
MAX_SEGMENT_BYTES = 1 << 48
SegmentSize = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEGMENT_BYTES)]


class ShmAttachReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """SHM_ATTACH reply: the segment to map, its size, and where the host pool ends inside it."""

    segment: p.ShortText
    size: SegmentSize
    pool_bytes: SegmentSize = 0


p.register_meta(SHM_BASE + ls.ATTACH, ShmAttachRequest, ShmAttachReply)
ls.register_lease_ops(SHM_BASE)


class SharedSegment:
    """A POSIX shared-memory segment under ``/dev/shm``, mapped, viewed as a flat ``uint8`` tensor."""

    def __init__(self, name: str, size: int, mapping: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self.size = size
        self._mmap: mmap.mmap | None = mapping
        self.owner = owner
        self.tensor = (
            torch.frombuffer(mapping, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        )

    @classmethod
    def create(cls, size: int) -> SharedSegment:
        """Create a new segment of ``size`` bytes, mode 0600 (pages are committed as they are touched)."""
        if not os.path.isdir(SHM_DIR):
            raise ConfigError(f"the shm transport needs POSIX shared memory at {SHM_DIR}")
        sweep_stale_segments()
        # tmpfs commits pages as they are written: a segment larger than the free space of /dev/shm would
        # fail later with SIGBUS (a container's default /dev/shm is 64 MiB): refuse now, clearly.
        st = os.statvfs(SHM_DIR)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise ConfigError(
                f"the shm transport needs {size} bytes of shared memory but {SHM_DIR} has {free} free; "
                "enlarge it (e.g. docker --shm-size) or make the host cache smaller"
            )
        name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, size, mapping, owner=True)

    @classmethod
    def open(cls, name: str, size: int) -> SharedSegment:
        """Map an existing segment; checks its name, size, owner and mode first."""
        if not _NAME.match(name):
            raise ProtocolError(f"bad shared-memory segment name {name!r}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConnectError(
                f"cannot open the server's shared memory {path} ({exc}); kvs+shm:// needs a server on this "
                "host run by the same user"
            ) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise ProtocolError(f"shared memory {name}: {st.st_size} bytes, the server said {size}")
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ConnectError(f"shared memory {name} is not private to this user; refusing to map it")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mapping, owner=False)

    def close(self) -> None:
        """Drop this process's mapping (lazily, once no tensor refers to it); the owner unlinks the name."""
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
            self.owner = False
        self.tensor = torch.empty(0, dtype=torch.uint8)
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # views still exported (a caller holds a tensor): unmapped when they are freed


def sweep_stale_segments() -> int:
    """Unlink this user's kvstrata segments whose creating process is gone (left by a SIGKILL)."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        path = os.path.join(SHM_DIR, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
        except OSError:
            continue
    if removed:
        log.info("removed %d shared-memory segments left by dead servers", removed)
    return removed


#: Pieces a host-to-host batch is cut into, so that the threads copying it share the work evenly.
_PIECE_BYTES = 1 << 20
#: Batches smaller than this are copied by the calling thread alone (waking a helper costs more).
_PARALLEL_MIN_BYTES = 1 << 20
#: Most helper threads a client process starts (memory bandwidth, not cores, bounds copies beyond).
_MAX_HELPERS = 3
# ctypes' foreign calls release the GIL, so helpers copy in parallel with the caller; one memmove per piece
# (numpy's copyto and torch's copy_ cost microseconds more per call, and torch's copy_ splits each chunk
# over all of its OpenMP threads with a static split: one descheduled thread stalls the whole copy).
# Against one torch._foreach_copy_ per batch (OpenMP workers that spin between copies), 64 x 256 KiB: puts
# 1.1-1.2x slower in bench/transport.py, which times a call right after an untimed one, while the workers
# still spin; but gets with 5 ms between them 2.1 against 2.3 ms, and with 50 ms (an engine computing
# between gets) 3.9 against 7.5 ms at a third of the CPU time: the workers sleep by then, and after each
# batch they spin on the other core for milliseconds.
_memmove = ctypes.memmove


def _cpu_probe() -> Callable[[], int] | None:
    """libc's ``sched_getcpu`` (the CPU the calling thread runs on), or ``None`` where there is none."""
    try:
        probe = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    probe.restype, probe.argtypes = ctypes.c_int, []
    return cast("Callable[[], int]", probe)


Piece = tuple[int, int, int]


class _Batch:
    """One batch of pieces ``(destination address, source address, bytes)`` shared by the copying threads."""

    __slots__ = ("error", "next", "pieces")

    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        #: the next piece to take: ``next()`` on an itertools.count is atomic under the GIL
        self.next: Iterator[int] = itertools.count()
        self.error: BaseException | None = None

    def drain(self) -> None:
        pieces, count = self.pieces, len(self.pieces)
        for i in self.next:
            if i >= count:
                return
            dst, src, nbytes = pieces[i]
            _memmove(dst, src, nbytes)


class HostCopier:
    """Copies a batch of host memory spans with the calling thread plus up to ``helpers`` helper threads.

    Work is shared dynamically (each thread takes the next piece), so a helper that the OS does not run
    soon (a small machine whose other core is busy) only means the caller copies more itself; it never
    waits for a helper that has not started. One batch uses the helpers at a time: another thread's batch
    meanwhile is copied by that thread alone. Helpers are daemon threads started on first use (again in a
    forked child) and sleep between batches.

    The helpers are kept off the CPU the caller runs on (their affinity is every allowed CPU but that
    one, updated when the caller moves). Linux often wakes a sleeping thread on its waker's CPU, where it
    preempts the waker: on a 2-core machine a woken helper took the caller's CPU and copied the batch
    alone while the other core idled (measured, 64 x 256 KiB after 25 ms of quiet: the caller's first
    memmove took 1.7 ms, the helper did 63 of 64 pieces, and two threads copied no faster than one).
    """

    _start_lock = threading.Lock()

    def __init__(self, helpers: int) -> None:
        self.helpers = max(0, helpers)
        self._pid = -1
        self._use = threading.Lock()
        self._cv = threading.Condition()
        self._batch: _Batch | None = None
        self._serial = 0
        self._busy = 0
        #: the helpers' thread ids, the CPUs this process may use, the CPU they were last steered off
        self._tids: list[int] = []
        self._allowed: set[int] = set()
        self._steered = -1

    def copy(self, pieces: list[Piece]) -> None:
        """Copy every piece; returns once all are done (raises what a copy raised)."""
        batch = _Batch(pieces)
        total = 0
        for piece in pieces:
            total += piece[2]
        if self.helpers == 0 or len(pieces) < 2 or total < _PARALLEL_MIN_BYTES:
            batch.drain()
            return
        if self._pid != os.getpid():
            with self._start_lock:
                if self._pid != os.getpid():
                    self._start()
        if not self._use.acquire(blocking=False):
            batch.drain()
            return
        try:
            self._steer()
            with self._cv:
                self._batch = batch
                self._serial += 1
                self._cv.notify_all()
            try:
                batch.drain()
            finally:
                with self._cv:
                    self._batch = None  # a helper that wakes only now finds nothing to join
                    while self._busy:
                        self._cv.wait()
        finally:
            self._use.release()
        if batch.error is not None:
            raise batch.error

    def _steer(self) -> None:
        """Keep the helpers off the caller's CPU (see the class doc); best effort, never raises."""
        if _CPU is None or not self._tids:
            return
        cpu = _CPU()
        if cpu == self._steered:
            return
        others = self._allowed - {cpu}
        if not others:
            return
        try:
            for tid in list(self._tids):
                os.sched_setaffinity(tid, others)
        except OSError:  # the allowed CPUs changed under us (cpuset, taskset): steer again from scratch
            self._allowed = _allowed_cpus()
            self._steered = -1
            return
        self._steered = cpu

    def _start(self) -> None:
        """Start the helpers (the first time, or in a forked child, where the parent's threads are gone)."""
        self._use = threading.Lock()
        self._cv = threading.Condition()
        self._batch = None
        self._busy = 0
        self._tids = []
        self._allowed = _allowed_cpus()
        self._steered = -1
        self._pid = os.getpid()
        for i in range(self.helpers):
            name = f"kvstrata-shm-copy-{i}"
            threading.Thread(target=self._helper, args=(self._serial,), name=name, daemon=True).start()

    def _helper(self, seen: int) -> None:
        cv = self._cv
        with cv:
            self._tids.append(threading.get_native_id())
        while True:
            with cv:
                while self._batch is None or self._serial == seen:
                    cv.wait()
                seen = self._serial
                batch = self._batch
                self._busy += 1
            try:
                batch.drain()
            except BaseException as exc:  # the caller must not report a piece nobody copied as done
                batch.error = exc
            finally:
                with cv:
                    self._busy -= 1
                    if not self._busy:
                        cv.notify_all()


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


def _helpers() -> int:
    cores = len(_allowed_cpus()) or os.cpu_count() or 1
    return min(_MAX_HELPERS, cores - 1)


#: libc's sched_getcpu, for steering the copy helpers (None: not steered)
_CPU = _cpu_probe()
#: The process-wide copier of the shm clients.
_COPIER = HostCopier(_helpers())


class ShmServerExtension(ServerExtension):
    """The shm transport's server side: the host pool in a shared segment, leases over the control port."""

    name = "shm"

    def __init__(
        self, config: Any, *, staging_slots: int = STAGING_SLOTS, lease_ttl_s: float | None = None
    ) -> None:
        super().__init__(config)
        self.slot_bytes = ls.slot_bytes_of(config)
        self.staging_slots = max(1, staging_slots)
        self.lease_ttl_s = lease_ttl_s if lease_ttl_s is not None else ls.DEFAULT_LEASE_TTL_S
        self.segment: SharedSegment | None = None
        self.pool_bytes = 0
        self.leases: ls.LeaseServer | None = None
        self._handlers: dict[int, Any] = {}

    def host_buffer(self, capacity_bytes: int) -> torch.Tensor | None:
        """Create the segment (host pool + staging) and hand the pool part to the host tier.

        When shared memory is too small for the pool, the pool stays in private memory (``None``) and the
        transport runs on staging slots alone (one more copy per get).
        """
        try:
            self.segment = SharedSegment.create(capacity_bytes + self.staging_slots * self.slot_bytes)
        except (ConfigError, OSError) as exc:
            log.warning("shm: host pool not in shared memory (%s); shm gets will be staged", exc)
            return None
        self.pool_bytes = capacity_bytes
        log.info("shm: host pool in shared memory %s (%d bytes)", self.segment.name, self.segment.size)
        return self.segment.tensor[:capacity_bytes]

    def attach(self, store: Any) -> None:
        """Set up staging and leases; without a pool in the segment every get goes through staging.

        Without any usable shared memory the transport is switched off (its requests are answered
        ``unsupported``; tcp is unaffected).
        """
        if self.segment is None:
            self.pool_bytes = 0
            try:
                self.segment = SharedSegment.create(self.staging_slots * self.slot_bytes)
            except (ConfigError, OSError) as exc:
                log.warning("shm transport disabled: %s", exc)
                return
        host = store.tier("host") if hasattr(store, "tier") else None
        buffer = getattr(host, "buffer", None)
        if buffer is None or self._offset(buffer) is None:
            log.warning("shm: the host tier is not in shared memory; gets are staged (one extra copy)")
            self.pool_bytes = 0
        seg = self.segment
        staging = ls.StagingPool(seg.tensor[self.pool_bytes :], self.slot_bytes)
        self.leases = ls.LeaseServer(
            SHM_BASE,
            staging,
            self._offset,
            lambda slot: self.pool_bytes + slot * self.slot_bytes,
            lease_ttl_s=self.lease_ttl_s,
            max_reserved_bytes=ls.reservation_bound(self.pool_bytes, self.slot_bytes, staging.num_slots),
        )
        self._handlers = dict(self.leases.handlers())

    def _offset(self, data: torch.Tensor) -> int | None:
        """Offset of ``data`` in the segment when it lies inside the host pool part, else ``None``."""
        if self.segment is None or not data.is_cpu:
            return None
        base = self.segment.tensor.data_ptr()
        ptr = data.data_ptr()
        end = ptr + data.numel() * data.element_size()
        limit = base + (self.pool_bytes or self.segment.size)
        return ptr - base if base <= ptr and end <= limit else None

    def handlers(self) -> Mapping[int, Any]:
        """SHM_ATTACH and the four lease operations."""

        async def on_attach(conn: Any, header: Header, meta: Any) -> None:
            if self.segment is None:
                raise RemoteError("the shm transport is not available on this server", "unsupported")
            reply = ShmAttachReply(
                segment=self.segment.name, size=self.segment.size, pool_bytes=self.pool_bytes
            )
            await conn.reply(SHM_BASE + ls.ATTACH, header.request_id, reply)

        def lease_op(offset: int) -> Any:
            async def handler(conn: Any, header: Header, meta: Any) -> None:
                target = self._handlers.get(SHM_BASE + offset)
                if target is None:
                    raise RemoteError("the shm transport is not available on this server", "unsupported")
                await target(conn, header, meta)

            return handler

        out: dict[int, Any] = {SHM_BASE + ls.ATTACH: on_attach}
        for offset in (ls.GET, ls.RELEASE, ls.PUT_BEGIN, ls.PUT_COMMIT):
            out[SHM_BASE + offset] = lease_op(offset)
        return out

    def connection_closed(self, connection: Any) -> None:
        """End the connection's leases."""
        if self.leases is not None:
            self.leases.owner_closed(id(connection))

    def close(self) -> None:
        """End every lease and unlink the segment."""
        if self.leases is not None:
            self.leases.close()
        if self.segment is not None:
            self.segment.close()


class ShmTransport(ls.LeaseTransport):
    """``kvs+shm://host:port``: the kvs control connection plus the server's mapped host pool."""

    scheme = "kvs+shm"
    name = "shm"
    base = SHM_BASE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.segment: SharedSegment | None = None

    def _attach(self) -> None:
        op = SHM_BASE + ls.ATTACH
        rid = self._request(op, ShmAttachRequest())
        _, reply = self._reply(rid, op)
        if reply.pool_bytes > reply.size:
            raise ProtocolError(f"{self.address}: SHM_ATTACH reply is inconsistent")
        self.segment = SharedSegment.open(reply.segment, reply.size)

    def _mapping(self) -> SharedSegment:
        seg = self.segment
        if seg is None:
            raise ConnectError(f"{self.address}: shared memory not mapped")
        return seg

    def _read_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        self._move(spans, to_segment=False)

    def _write_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        self._move(spans, to_segment=True)

    def _move(self, spans: Sequence[tuple[int, torch.Tensor]], *, to_segment: bool) -> None:
        """Copy between each local tensor and its span of the segment: host tensors as one batch of
        memmoves shared by the copier's threads, device tensors with ``copy_`` (straight to/from the
        mapping)."""
        seg = self._mapping()
        mapping = seg.tensor  # held until the copies are done: the mapping cannot be closed under them
        base = mapping.data_ptr()
        size = seg.size
        pieces: list[Piece] = []
        uint8 = torch.uint8
        for position, local in spans:
            n = local.numel()
            if position < 0 or position + n > size:
                raise ProtocolError(f"{self.address}: span {position}+{n} outside the {size}-byte segment")
            if not (local.is_cpu and local.dtype is uint8 and local.is_contiguous()):
                there = mapping.narrow(0, position, n)
                if to_segment:
                    there.copy_(local)
                else:
                    local.copy_(there)
                continue
            ptr = local.data_ptr()
            dst, src = (base + position, ptr) if to_segment else (ptr, base + position)
            if n <= _PIECE_BYTES:
                pieces.append((dst, src, n))
                continue
            for offset in range(0, n, _PIECE_BYTES):
                pieces.append((dst + offset, src + offset, min(_PIECE_BYTES, n - offset)))
        if pieces:
            _COPIER.copy(pieces)
        del mapping

    def close(self) -> None:
        """Close the control connection and unmap the segment."""
        super().close()
        seg, self.segment = self.segment, None
        if seg is not None:
            seg.close()
