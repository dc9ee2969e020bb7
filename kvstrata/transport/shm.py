"""The shm transport (``kvs+shm://``): same-host clients copy straight out of the server's host pool.

The server's host tier is carved from one POSIX shared-memory segment (``/dev/shm``, created ``0600`` by the
server's user, followed by a few staging slots). A local client connects over the usual kvs control
connection (HELLO, auth), then asks for the segment's name with ``SHM_ATTACH`` — the name is never in the
pre-auth greeting — and maps it. Gets and puts then follow :mod:`kvstrata.transport.lease`: the server pins
the chunk and returns its offset, the client copies straight between its tensor and the mapping (host
tensors: memmoves shared by the calling thread and helper threads, see
:class:`~kvstrata.transport.hostcopy.HostCopier`; device tensors: ``copy_``) and releases the lease; a put is
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

import logging
import mmap
import os
import re
import secrets
import stat
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import torch

from kvstrata.errors import ConfigError, ConnectError, ProtocolError
from kvstrata.transport import lease as ls
from kvstrata.transport import protocol as p
from kvstrata.transport.hostcopy import COPIER, PIECE_BYTES, Piece

__all__ = [
    "MAX_SEGMENT_BYTES",
    "SHM_BASE",
    "SharedSegment",
    "ShmAttachReply",
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
            if n <= PIECE_BYTES:
                pieces.append((dst, src, n))
                continue
            for offset in range(0, n, PIECE_BYTES):
                pieces.append((dst + offset, src + offset, min(PIECE_BYTES, n - offset)))
        if pieces:
            COPIER.copy(pieces)
        del mapping

    def close(self) -> None:
        """Close the control connection and unmap the segment."""
        super().close()
        seg, self.segment = self.segment, None
        if seg is not None:
            seg.close()
