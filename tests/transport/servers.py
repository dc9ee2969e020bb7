"""Cache servers for tests: in-process (a real asyncio server on a real socket, in a thread) and real
``kvstrata serve`` processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstrata.kvstore.host import HostTier
from kvstrata.kvstore.store import Store
from kvstrata.server.app import CacheServer
from tests.conftest import free_port


class InProcessServer:
    """A CacheServer over a fresh host-tier Store, served from a background event loop thread."""

    def __init__(
        self, capacity: int = 64 << 20, slot: int = 1 << 20, *, store: Any = None, **server_kwargs: Any
    ) -> None:
        self.store = store if store is not None else Store([HostTier(capacity, slot)])
        self._kwargs = server_kwargs
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server: CacheServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None
        self._stopped = False

    def _run(self) -> None:
        async def main() -> None:
            self.server = CacheServer(self.store, port=0, **self._kwargs)
            await self.server.start()
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await self.server.stop(grace=2.0)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"kvs://127.0.0.1:{self.server.port}"

    def start(self) -> InProcessServer:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self.store.close()

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServeProcess:
    """A real ``kvstrata serve`` process on free ports."""

    def __init__(
        self, tmp: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = port or 0  # 0: the server picks a free port and logs it
        self.admin_port = free_port()
        self.tmp = tmp
        self.extra = list(extra)
        self.env = {**os.environ, "KVSTRATA_SERVER_TRANSPORTS": "tcp", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / f"serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"kvs://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kvstrata.cli",
            "serve",
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--host-cache",
            "64MiB",
            "--slot-size",
            "4MiB",
            "--disk-cache",
            "0",
            *self.extra,
        ]

    def start(self, wait: bool = True) -> ServeProcess:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            pattern = re.compile(r"data port listening on kvs://[^:]+:(\d+)")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = self.log.read_bytes()[offset:].decode(errors="replace")
                match = pattern.search(text)
                if match:
                    self.port = int(match.group(1))
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            self.kill()
            raise RuntimeError(f"kvstrata serve did not start:\n{self.output()}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def serve_many(tmp: Path, count: int, *extra: str) -> Sequence[ServeProcess]:
    return [ServeProcess(tmp, *extra).start() for _ in range(count)]
