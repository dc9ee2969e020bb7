"""The Store's background work: one bounded queue feeding a few worker threads.

Call order: ``BackgroundPool(run, ...)`` starts the workers; ``submit(job, run_if_full=...)`` any number
of times from any thread; ``flush(timeout)`` waits until nothing is queued or running; ``close()`` refuses
new jobs, flushes (up to 30 s) and stops the workers.

Failure semantics: ``run(job)`` must not raise (the Store's runner logs and counts each failure itself);
should it raise anyway, the worker logs it and goes on. A queue that is full either runs the job on the
submitting thread (``run_if_full``: back-pressure for work that must happen) or skips it and counts it in
:attr:`BackgroundPool.skipped` (work that is only an optimisation). Workers are daemon threads, so a job
stuck on a hung medium never keeps the process from exiting.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BackgroundPool"]

log = logging.getLogger(__name__)

_J = TypeVar("_J")


class BackgroundPool(Generic[_J]):
    """A bounded job queue and its worker threads. Thread-safe. See the module docstring."""

    def __init__(self, run: Callable[[_J], None], *, queue_size: int, workers: int, name: str) -> None:
        self._run = run
        self._queue: queue.Queue[_J | None] = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()
        self._pending = 0  # jobs queued or running
        self._closed = False
        #: jobs skipped because the queue was full
        self.skipped = 0
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, job: _J, *, run_if_full: bool) -> bool:
        """Queue ``job``; if the queue is full, run it here (``run_if_full``) or skip it (``False``).
        ``False`` too once the pool is closed."""
        with self._cond:
            if self._closed:
                return False
            self._pending += 1
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
        if run_if_full:
            self._run(job)
            return True
        with self._cond:
            self.skipped += 1
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; ``False`` if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, finish the queued ones (up to ``timeout`` s) and stop the workers; idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if not self.flush(timeout=timeout):
            log.warning("store: closing with background work still pending")
        for _ in self._workers:
            try:
                self._queue.put(None, timeout=5.0)
            except queue.Full:  # workers stuck on a hung tier: they are daemons, leave them
                break
        for worker in self._workers:
            worker.join(timeout=5.0)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:
                log.exception("store: background job %r failed", job)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()
