"""``DiskTier``: chunks as files in a local directory, bounded in size, checksummed, crash-safe.

One file per chunk (the on-disk format is specified in docs/disk-format.md): ``DIR/<kk>/<key hex>.kvc``,
where ``<kk>`` is the key's first byte in hex (256 subdirectories keep directories small). Chunks are large
(0.5-32 MiB) and written whole, so a file per chunk costs one open/rename/unlink per megabytes of data,
eviction is one ``unlink`` that returns the space at once, and a crash can only ever damage the file being
written. Segment files would save inodes but need compaction to reclaim evicted space, which rewrites live
data and makes crash safety harder; they win only for many small records, which kvstrata does not store.

Each file is a header (magic, format version, key, layout fingerprint, codec, token count, block keys,
payload length, payload checksum, header checksum), zero-padded to a multiple of 4 KiB so the payload is
page-aligned, then the payload. The checksum is XXH3-64 when the ``xxhash`` package is installed (about 15
GiB/s, so it costs little beside the I/O), CRC-32 (zlib) otherwise; the header records which.

Writes and crash safety: a put writes a temporary ``.<key>.<pid>.<seq>.tmp`` in the same subdirectory and
renames it over the final name (atomic on POSIX). A process killed in the middle leaves only a temporary
file, which the next start-up deletes. With ``fsync=True`` the put returns only after the file's data
(``fdatasync``) and the subdirectory (``fsync``) are on stable storage, so it survives a power loss; both
flushes come after the rename, which costs one journal commit per put instead of two (a power loss before
them can leave the new name on incomplete data: the checksums turn that into a miss, see
:meth:`DiskTier._make_durable`). Only one ``DiskTier`` may use a directory at a time (an exclusive
``flock`` on ``DIR/LOCK``).

Start-up rebuilds the catalog from the directory: every ``*.kvc`` file whose header is intact and whose
size matches its header is kept (coldest first by modification time); partial, temporary and corrupt files
are deleted and counted (:attr:`DiskTier.recovery`, and corrupt ones as ``errors``). Payloads are verified
on every read, not at start-up (that would read the whole cache): a read whose checksum fails, or whose
file is short or gone, is a miss; the file is deleted and the error counted.

Capacity counts whole files (header + payload), so ``used_bytes`` is what the directory really holds, short
of file-system block rounding. ``victims(n)`` adds up the same file sizes. A full file system (``ENOSPC``,
``EDQUOT``) is met by evicting more chunks and retrying when ``evict=True``, otherwise (or when nothing is
left to evict) the put raises :class:`TierFullError`; reads go on. A file size limit (``EFBIG``) raises
:class:`ChunkTooLargeError`; other OS errors become :class:`TierIOError`. A failed put always removes its
temporary file; the chunk's previous version, if any, stays unless it was evicted to make room.

Locking: one lock guards the catalog, the eviction policy and every rename/unlink (so a file's name always
matches the catalog); payload writes, reads and checksums run outside it. A get opens the file under the
lock and reads it outside: POSIX keeps an open file readable even if it is replaced or deleted meanwhile.
``acquire`` reads the chunk into a fresh tensor and pins the entry (it is not evicted until released).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstrata.core.buffers import BufferLike, as_byte_tensor
from kvstrata.core.chunk import EMPTY_META, ChunkHandle, ChunkMeta, check_key
from kvstrata.core.keys import KEY_BYTES
from kvstrata.errors import (
    ChunkTooLargeError,
    InvalidArgumentError,
    StoreError,
    TierFullError,
    TierIOError,
)
from kvstrata.kvstore.catalog import Catalog
from kvstrata.kvstore.diskformat import (
    MAX_HEADER_BYTES,
    Hasher,
    checksum,
    checksum_name,
    decode_header,
    default_checksum,
    encode_header,
)
from kvstrata.kvstore.eviction import make_policy
from kvstrata.kvstore.tier import Tier

__all__ = ["DiskTier", "RecoveryReport"]

log = logging.getLogger(__name__)

#: Reads are checksummed piece by piece while the piece is still in the CPU cache (the L3 of a server CPU
#: holds a few MiB; a smaller piece costs more system calls than it saves in cache misses).
_READ_PIECE = 4 * 1024 * 1024
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CHUNK_NAME = re.compile(r"^[0-9a-f]{32}\.kvc$")
_SUBDIR_NAME = re.compile(r"^[0-9a-f]{2}$")
#: Eviction-and-retry rounds after the file system reports it is full.
_FULL_RETRIES = 8


class _Entry:
    """One stored chunk in the catalog."""

    __slots__ = ("algorithm", "charge", "header_len", "length", "meta", "path", "pins", "sum")

    def __init__(
        self, path: str, meta: ChunkMeta, header_len: int, length: int, payload_sum: int, algorithm: int
    ):
        self.path = path
        self.meta = meta
        self.header_len = header_len
        self.length = length
        self.sum = payload_sum
        self.algorithm = algorithm
        self.charge = header_len + length
        self.pins = 0


@dataclass(slots=True)
class RecoveryReport:
    """What start-up found in the directory."""

    chunks: int = 0
    bytes: int = 0
    partial_dropped: int = 0
    corrupt_dropped: int = 0
    evicted: int = 0
    corrupt_files: list[str] = field(default_factory=list)


class DiskTier(Tier):
    """Chunks as checksummed files under ``directory``, at most ``capacity_bytes`` of them (module doc).

    ``fsync``: flush each file and its directory entry to stable storage before the put returns (survives
    power loss; slower). ``policy``: the eviction policy's name (``"lru"`` or ``"s3fifo"``).
    """

    name = "disk"
    catalog_meta = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        fsync: bool = False,
        policy: str = "lru",
    ) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise InvalidArgumentError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self._dir = Path(directory)
        self._capacity = int(capacity_bytes)
        self._fsync = fsync
        self._algorithm = default_checksum()
        self._lock = threading.Lock()
        # Victims and the byte count go by the file's size (header included); size_of by the payload.
        self._catalog: Catalog[_Entry] = Catalog(
            self._lock, make_policy(policy), charge=lambda e: e.charge, length=lambda e: e.length
        )
        self._used = 0  # bytes of the committed files
        self._reserved = 0  # bytes of the files being written
        self._seq = 0
        self._subdirs: set[str] = set()
        self._closed = False
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._dir / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise TierIOError(f"cannot open the disk tier directory {self._dir}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise StoreError(f"the disk tier directory {self._dir} is in use by another process") from exc
        try:
            self.recovery = self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- start-up ----------------------------------------------------------------------------------
    def _recover(self) -> RecoveryReport:
        report = RecoveryReport()
        found: list[tuple[float, bytes, _Entry]] = []
        for sub in sorted(os.scandir(self._dir), key=lambda e: e.name):
            if not (_SUBDIR_NAME.match(sub.name) and sub.is_dir(follow_symlinks=False)):
                continue
            self._subdirs.add(sub.name)
            for item in os.scandir(sub.path):
                if item.name.startswith(".") and item.name.endswith(".tmp"):
                    self._unlink(item.path)  # a write that never committed
                    report.partial_dropped += 1
                elif _CHUNK_NAME.match(item.name):
                    entry = self._load(item.path, bytes.fromhex(item.name[:32]), sub.name)
                    if entry is None:
                        report.corrupt_dropped += 1
                        report.corrupt_files.append(item.path)
                        self._count("errors")
                        self._unlink(item.path)
                    else:
                        found.append((item.stat().st_mtime, entry.path.encode(), entry))
        found.sort(key=lambda f: (f[0], f[1]))  # coldest (oldest) first
        for _, _, entry in found:
            key = bytes.fromhex(os.path.basename(entry.path)[:32])
            self._catalog.add(key, entry, entry.charge)
            self._used += entry.charge
        # A capacity smaller than what an earlier run left behind: drop the coldest (nothing is pinned yet).
        for key, entry in list(self._catalog.unpinned()):
            if self._used <= self._capacity:
                break
            self._drop(key, entry)
            report.evicted += 1
        report.chunks = len(self._catalog)
        report.bytes = self._used
        if report.partial_dropped or report.corrupt_dropped or report.evicted:
            log.warning(
                "disk tier %s: dropped %d partial and %d corrupt files, evicted %d over capacity",
                self._dir,
                report.partial_dropped,
                report.corrupt_dropped,
                report.evicted,
            )
        return report

    def _load(self, path: str, key: bytes, subdir: str) -> _Entry | None:
        """The catalog entry of an intact chunk file, or ``None`` for a corrupt or partial one."""
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size

                def read(offset: int, length: int) -> bytes:
                    return os.pread(f.fileno(), min(length, MAX_HEADER_BYTES), offset)

                header = decode_header(read)
        except (OSError, ValueError) as exc:
            log.warning("disk tier: dropping unreadable chunk file %s: %s", path, exc)
            return None
        if header.key != key or key[:1].hex() != subdir:
            log.warning("disk tier: dropping %s: its header names another key", path)
            return None
        if size != header.header_len + header.payload_len or header.header_len + header.payload_len > (
            self._capacity
        ):
            log.warning(
                "disk tier: dropping %s: %d bytes, its header says %d", path, size, header.payload_len
            )
            return None
        return _Entry(
            path, header.meta, header.header_len, header.payload_len, header.payload_sum, header.algorithm
        )

    # -- helpers -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the disk tier is closed")

    def _path(self, key: bytes) -> str:
        return os.path.join(self._dir, key[:1].hex(), key.hex() + ".kvc")

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # The catalog forgets it anyway; a leftover file is dropped or re-read at the next start-up.
            log.warning("disk tier: cannot delete %s: %s", path, exc)

    def _drop(self, key: bytes, entry: _Entry) -> None:
        """Forget a chunk and delete its file (lock held)."""
        self._catalog.pop(key)
        self._used -= entry.charge
        self._unlink(entry.path)

    def _evict_for(
        self, charge: int, evict: bool, evicted: list[tuple[bytes, ChunkMeta]], *, force: bool = False
    ) -> None:
        """Make room for ``charge`` more bytes (lock held); ``force`` frees them even if the count fits."""
        needed = self._used + self._reserved + charge - self._capacity
        if force:
            needed = max(needed, charge)
        if needed <= 0:
            return
        if not evict:
            raise TierFullError(
                f"the disk tier is full ({self._used + self._reserved} of {self._capacity} bytes)"
            )
        chosen, freed = self._catalog.coldest(needed)
        if freed < needed:
            raise TierFullError("the disk tier is full and every chunk that could make room is pinned")
        for key, entry in chosen:
            self._drop(key, entry)
            evicted.append((key, entry.meta))
            self._count("evictions")

    def _ensure_subdir(self, name: str) -> None:
        if name in self._subdirs:
            return
        path = self._dir / name
        path.mkdir(exist_ok=True)
        if self._fsync:
            self._fsync_dir(self._dir)
        self._subdirs.add(name)

    @staticmethod
    def _fsync_dir(path: str | os.PathLike[str]) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_file(self, path: str, header: bytes, payload: memoryview) -> int:
        """Write header + payload to a new file and return its open descriptor (the caller closes it).

        Raises OSError (the file is closed; the caller deletes it).
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            total = len(header) + len(payload)
            done = os.writev(fd, [header, payload])
            while done < total:  # short writes happen on signals and on some file systems
                if done < len(header):
                    done += os.write(fd, header[done:])
                else:
                    done += os.write(fd, payload[done - len(header) :])
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _read_payload(fd: int, entry: _Entry, dst: torch.Tensor) -> bool:
        """Read the payload into ``dst`` (1-D uint8 CPU, exactly ``entry.length``); ``False`` if corrupt.

        The bytes go straight from the page cache into ``dst`` (``preadv`` on a view of it); each piece is
        checksummed right after it lands, while it is still in the CPU cache.
        """
        length = entry.length
        if length == 0:
            return checksum(entry.algorithm, b"") == entry.sum
        view = memoryview(dst.numpy())  # type: ignore[arg-type]
        if length <= _READ_PIECE:
            got = os.preadv(fd, [view], entry.header_len)
            # A short read means the file is shorter than its header says: truncated.
            return got == length and checksum(entry.algorithm, view) == entry.sum
        hasher = Hasher(entry.algorithm)
        pos = 0
        while pos < length:
            piece = view[pos : pos + _READ_PIECE]
            got = os.preadv(fd, [piece], entry.header_len + pos)
            if got <= 0:
                return False
            hasher.update(piece[:got])
            pos += got
        return hasher.value() == entry.sum

    # -- the Tier contract -------------------------------------------------------------------------
    def put(self, key: bytes, data: BufferLike, meta: ChunkMeta = EMPTY_META, *, evict: bool = True) -> None:
        """Write ``data`` to a new file and rename it into place (see :meth:`Tier.put` and the module doc)."""
        key = check_key(key)
        src = as_byte_tensor(data).detach()
        if src.device.type != "cpu":
            src = src.cpu()  # the file API needs host memory
        length = src.numel()
        payload = src.numpy().data.cast("B") if length else memoryview(b"")
        payload_sum = checksum(self._algorithm, payload)
        header = encode_header(key, meta, length, payload_sum, self._algorithm)
        charge = len(header) + length
        if charge > self._capacity:
            raise ChunkTooLargeError(f"a {length}-byte chunk exceeds the disk tier ({self._capacity} bytes)")
        evicted: list[tuple[bytes, ChunkMeta]] = []
        try:
            with self._lock:
                self._check_open()
                self._evict_for(charge, evict, evicted)
                self._reserved += charge
                self._seq += 1
                tmp = os.path.join(self._dir, key[:1].hex(), f".{key.hex()}.{os.getpid()}.{self._seq}.tmp")
                try:
                    self._ensure_subdir(key[:1].hex())
                except OSError as exc:
                    self._reserved -= charge
                    self._count("errors")
                    raise TierIOError(f"cannot create a disk tier directory: {exc}") from exc
            fd = self._write_with_retries(tmp, header, payload, charge, evict, evicted)
            entry = _Entry(self._path(key), meta, len(header), length, payload_sum, self._algorithm)
            try:
                self._commit(key, tmp, entry)
            except BaseException:
                os.close(fd)
                raise
            if self._fsync:
                self._make_durable(key, entry, fd)
            else:
                os.close(fd)
        finally:
            if evicted:
                self._emit_removed([k for k, _ in evicted], [m for _, m in evicted])
        self._emit_stored([key], [meta])

    def _write_with_retries(
        self,
        tmp: str,
        header: bytes,
        payload: memoryview,
        charge: int,
        evict: bool,
        evicted: list[tuple[bytes, ChunkMeta]],
    ) -> int:
        """Write the temporary file (returns its descriptor); on a full file system evict and retry
        (``evict=True``) or refuse."""
        for attempt in range(_FULL_RETRIES + 1):
            try:
                return self._write_file(tmp, header, payload)
            except OSError as exc:
                self._unlink(tmp)
                full = exc.errno in _FULL_ERRNOS
                with self._lock:
                    self._count("errors")
                    if full and evict and attempt < _FULL_RETRIES and not self._closed:
                        try:
                            # The file system has less room than the tier's bound: free real space.
                            self._evict_for(charge, True, evicted, force=True)
                            continue
                        except TierFullError:
                            pass
                    self._reserved -= charge
                if full:
                    raise TierFullError(f"the disk under {self._dir} is full: {exc}") from exc
                if exc.errno == errno.EFBIG:  # a per-file size limit (RLIMIT_FSIZE, the file system's)
                    raise ChunkTooLargeError(f"a chunk file exceeds a file size limit: {exc}") from exc
                raise TierIOError(f"writing a chunk file under {self._dir} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _commit(self, key: bytes, tmp: str, entry: _Entry) -> None:
        final = entry.path
        with self._lock:
            self._reserved -= entry.charge
            if self._closed:
                self._unlink(tmp)
                raise StoreError("the disk tier was closed during a put")
            try:
                os.rename(tmp, final)  # atomically replaces an older version of the chunk
            except OSError as exc:
                self._unlink(tmp)
                self._count("errors")
                raise TierIOError(f"renaming a chunk file under {self._dir} failed: {exc}") from exc
            old = self._catalog.pop(key)
            if old is not None:
                self._used -= old.charge  # its file was replaced by the rename, not deleted
            self._catalog.add(key, entry, entry.charge)
            self._used += entry.charge
            self._count("puts")
            self._count("bytes_written", entry.length)

    def _make_durable(self, key: bytes, entry: _Entry, fd: int) -> None:
        """Flush a committed chunk's data and its directory entry (``fsync=True``); closes ``fd``.

        This runs after the rename on purpose: on journalling file systems the data flush then commits the
        rename in the same journal transaction, and the directory fsync finds little left to do (one journal
        commit per put instead of two). Crash safety does not depend on the order: a crash before the flush
        can leave the new name on incomplete data, which start-up (size, header checksum) or the read
        (payload checksum) turns into a miss. The put returns only once both flushes are done.
        """
        try:
            try:
                os.fdatasync(fd)  # data and the size/allocation metadata needed to read it back
            finally:
                os.close(fd)
            self._fsync_dir(os.path.dirname(entry.path))
        except OSError as exc:
            with self._lock:
                self._count("errors")
                dropped = self._catalog.get(key) is entry
                if dropped:
                    self._drop(key, entry)
            if dropped:
                self._emit_removed([key], [entry.meta])
            raise TierIOError(f"flushing {entry.path} to stable storage failed: {exc}") from exc

    def _open(self, key: bytes, pin: bool) -> tuple[_Entry, int] | None:
        """Look the chunk up and open its file (``None``: a miss, counted)."""
        with self._lock:
            self._check_open()
            entry = self._catalog.get(key)
            if entry is None:
                self._count("misses")
                return None
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # Deleted behind the tier's back: forget it (below, outside the lock, tell the listeners).
                self._drop(key, entry)
                self._count("errors")
                self._count("misses")
            except OSError as exc:
                self._count("errors")
                raise TierIOError(f"opening {entry.path} failed: {exc}") from exc
            else:
                self._catalog.touch(key)
                if pin:
                    entry.pins += 1
                return entry, fd
        self._emit_removed([key], [entry.meta])
        return None

    def _read(self, key: bytes, entry: _Entry, fd: int, dst: torch.Tensor) -> bool:
        """Read and verify into ``dst``; a corrupt chunk is dropped and counted (returns ``False``)."""
        try:
            intact = self._read_payload(fd, entry, dst)
        except OSError as exc:
            with self._lock:
                self._count("errors")
            raise TierIOError(f"reading {entry.path} failed: {exc}") from exc
        finally:
            os.close(fd)
        dropped = False
        with self._lock:
            if intact:
                self._count("hits")
                self._count("bytes_read", entry.length)
                return True
            log.warning("disk tier: %s failed its checksum; dropped", entry.path)
            self._count("errors")
            self._count("misses")
            if self._catalog.get(key) is entry:
                self._drop(key, entry)
                dropped = True
        if dropped:
            self._emit_removed([key], [entry.meta])
        return False

    def get(self, key: bytes, out: BufferLike | None = None) -> torch.Tensor | None:
        """Read the chunk straight into ``out`` (or a new tensor), verifying its checksum on the way."""
        key = check_key(key)
        dst: torch.Tensor | None = None
        if out is not None:
            # The common case (a flat uint8 host tensor, e.g. a pool slot) skips the generic conversion.
            if (
                type(out) is torch.Tensor
                and out.dtype is torch.uint8
                and out.dim() == 1
                and out.is_contiguous()
            ):
                dst = out
            else:
                dst = as_byte_tensor(out)
        opened = self._open(key, pin=False)
        if opened is None:
            return None
        entry, fd = opened
        length = entry.length
        if dst is not None and dst.numel() < length:
            os.close(fd)
            raise InvalidArgumentError(f"out holds {dst.numel()} bytes, the chunk {length}")
        if dst is None or not dst.is_cpu:
            target = torch.empty(length, dtype=torch.uint8)  # files are read through host memory
        else:
            target = dst if dst.numel() == length else dst[:length]
        if not self._read(key, entry, fd, target):
            return None
        if dst is not None and not dst.is_cpu:
            result = dst[:length]
            result.copy_(target)
            return result
        return target

    def acquire(self, key: bytes) -> ChunkHandle | None:
        """Read the chunk into a fresh tensor and pin it (it is not evicted until the handle is released)."""
        key = check_key(key)
        opened = self._open(key, pin=True)
        if opened is None:
            return None
        entry, fd = opened
        data = torch.empty(entry.length, dtype=torch.uint8)
        try:
            intact = self._read(key, entry, fd, data)
        except BaseException:
            self._unpin(entry)
            raise
        if not intact:
            self._unpin(entry)
            return None
        return ChunkHandle(key, data, entry.meta, lambda: self._unpin(entry))

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1

    def get_meta(self, key: bytes) -> ChunkMeta | None:
        """The chunk's metadata, or ``None`` if absent (not an access)."""
        return self._catalog.get_meta(key)

    def contains(self, key: bytes) -> bool:
        """Whether the chunk is in the catalog (not an access; its payload is verified on read)."""
        return self._catalog.contains(key)

    def remove(self, key: bytes) -> bool:
        """Delete the chunk's file."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            entry = self._catalog.get(key)
            if entry is None:
                return False
            self._drop(key, entry)
        self._emit_removed([key], [entry.meta])
        return True

    def victims(self, num_bytes: int) -> list[bytes]:
        """The coldest unpinned keys whose files add up to at least ``num_bytes``."""
        return self._catalog.victims(num_bytes)

    def keys(self) -> Iterator[bytes]:
        """A snapshot of the stored keys."""
        return self._catalog.keys()

    def size_of(self, key: bytes) -> int | None:
        """Payload bytes of the chunk, or ``None`` if absent."""
        return self._catalog.size_of(key)

    def path_of(self, key: bytes) -> Path | None:
        """The chunk's file (for operators and tests), or ``None`` if absent."""
        key = check_key(key)
        with self._lock:
            entry = self._catalog.get(key)
            return None if entry is None else Path(entry.path)

    def file_bytes(self, meta: ChunkMeta, payload_len: int) -> int:
        """The bytes a chunk of ``payload_len`` with ``meta`` takes on disk, as counted against capacity."""
        return len(encode_header(bytes(KEY_BYTES), meta, payload_len, 0, self._algorithm)) + payload_len

    @property
    def checksum_algorithm(self) -> str:
        """The checksum new files get: ``"xxh3-64"`` (with the xxhash package) or ``"crc32"``."""
        return checksum_name(self._algorithm)

    @property
    def directory(self) -> Path:
        """The tier's directory."""
        return self._dir

    @property
    def capacity_bytes(self) -> int:
        """The bound on the files' total size."""
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes of the chunk files, including those being written."""
        with self._lock:
            return self._used + self._reserved

    def __len__(self) -> int:
        return len(self._catalog)

    def close(self) -> None:
        """Forget the catalog and unlock the directory; the files stay for the next start-up."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._catalog.clear()
            os.close(self._lock_fd)
