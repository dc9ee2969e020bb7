"""Host-to-host copies of a batch of memory spans, shared by the calling thread and helper threads.

The shm client copies chunk bytes between its tensors and the server's mapped host pool; on a small
machine one thread's memmoves leave a core idle, so a batch is cut into pieces that the caller and up to
:data:`_MAX_HELPERS` helpers take in turn (see :class:`HostCopier` for why the helpers are steered off the
caller's CPU).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from typing import cast

__all__ = ["COPIER", "PIECE_BYTES", "HostCopier", "Piece"]

#: Pieces a host-to-host batch is cut into, so that the threads copying it share the work evenly.
PIECE_BYTES = 1 << 20
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


#: One span to copy: (destination address, source address, bytes).
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
COPIER = HostCopier(_helpers())
