"""``kvstrata serve``: build the Store and the transport extensions, run the data and admin servers, and
shut down cleanly on SIGTERM/SIGINT (in-flight requests finish, background disk writes are flushed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from kvstrata.config import KVStrataConfig, StoreConfig
from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.store import Store
from kvstrata.server.extension import ServerExtension, server_extension_class
from kvstrata.units import format_size

__all__ = ["build_store", "load_extensions", "run_daemon"]

log = logging.getLogger("kvstrata.server")

#: Seconds in-flight requests get to finish at shutdown.
SHUTDOWN_GRACE_S = 10.0
#: Seconds the Store gets to flush background disk writes at shutdown.
FLUSH_TIMEOUT_S = 60.0


def load_extensions(config: KVStrataConfig) -> list[ServerExtension]:
    """The server extensions of the configured transports; a transport not installed is skipped."""
    out: list[ServerExtension] = []
    for name in config.server.transports:
        try:
            cls = server_extension_class(name)
            if cls is not None:
                out.append(cls(config))
        except InvalidArgumentError as exc:
            log.warning("transport %s is not available, serving without it: %s", name, exc)
        except Exception:
            # An optional transport that fails to load must not take the tcp service down with it.
            log.exception("transport %s failed to load, serving without it", name)
    return out


def build_store(config: StoreConfig, extensions: Sequence[ServerExtension] = ()) -> Store:
    """The Store of ``config``; an extension may place the host tier's pool (e.g. in shared memory)."""
    from kvstrata.kvstore.build import available_memory_bytes

    host_bytes = config.host_cache_bytes or int(available_memory_bytes() * config.host_cache_fraction)
    host_bytes = max(host_bytes, config.slot_bytes)
    buffer = None
    for ext in extensions:
        buffer = ext.host_buffer(host_bytes)
        if buffer is not None:
            break
    return Store.from_config(config, host_buffer=buffer)


def attach_index(config: KVStrataConfig, store: Store, port: int) -> tuple[Any, Any]:
    """Open the configured block index and feed the store's tier events into it under this instance's name.

    Returns ``(index, feeder)``. The instance name is ``config.instance_id`` or ``hostname:port``. An index
    that cannot be opened is logged and skipped (``(None, None)``): the cache keeps serving without it.
    """
    from kvstrata.index.base import open_index
    from kvstrata.index.feeder import IndexFeeder

    instance = config.instance_id or f"{socket.gethostname()}:{port}"
    try:
        index = open_index(config.index.backend, config=config.index)
    except Exception:
        log.exception("index %s could not be opened; serving without it", config.index.backend)
        return None, None
    feeder = IndexFeeder(index, instance, heartbeat_s=max(0.5, config.index.lease_ttl_s / 3))
    feeder.attach(store)
    log.info("index %s: this server's tiers are published as instance %r", config.index.backend, instance)
    return index, feeder


@contextlib.contextmanager
def _event_loop_policy() -> Iterator[None]:
    try:
        import uvloop
    except ImportError:
        yield
        return
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(old)


def run_daemon(config: KVStrataConfig, token: bytes | None) -> None:
    """Run until SIGTERM or SIGINT."""
    import torch

    # The server copies one chunk at a time between its buffers and pool slots; torch's intra-op thread
    # pool only adds wake-up latency to those copies (10x slower puts measured on a busy 2-core host).
    torch.set_num_threads(1)
    with _event_loop_policy():
        asyncio.run(_main(config, token))


class _AdminServer:
    """uvicorn in our event loop, without uvicorn's own signal handling (ours drives the shutdown)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import socket

        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        # Bind here, so that port 0 works and the real port can be logged.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.server = Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5.0)
        self.sock.close()


async def _main(config: KVStrataConfig, token: bytes | None) -> None:
    from kvstrata.server.admin import create_admin_app
    from kvstrata.server.app import CacheServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    srv = config.server
    extensions = load_extensions(config)
    store = build_store(config.store, extensions)
    for ext in extensions:
        ext.attach(store)
    server = CacheServer(
        store,
        host=srv.host,
        port=srv.port,
        token=token,
        max_payload=srv.max_payload_bytes,
        max_connections=srv.max_connections,
        max_inflight_bytes=srv.max_inflight_bytes,
        write_timeout=srv.write_timeout_s,
        extensions=extensions,
        bulk_threads=srv.bulk_threads,
    )
    admin: _AdminServer | None = None
    index: Any = None
    feeder: Any = None
    try:
        await server.start()
        log.info("kvstrata serve: event loop %s", type(loop).__module__.split(".")[0])
        for tier in store.tiers:
            where = f" at {getattr(tier, 'directory', '')}" if tier.name == "disk" else ""
            log.info("tier %s: %s%s", tier.name, format_size(tier.capacity_bytes), where)
        log.info(
            "data port listening on kvs://%s:%d (transports: %s; auth: %s)",
            srv.host,
            server.port,
            ", ".join(server.transports),
            "token" if token else "none",
        )
        index, feeder = await loop.run_in_executor(None, attach_index, config, store, server.port)
        server.index = index
        if srv.admin_port:
            admin = _AdminServer(create_admin_app(server, token), srv.host, srv.admin_port)
            admin.start()
            log.info(
                "admin HTTP listening on http://%s:%d (/healthz /readyz /metrics /v1/stats /v1/lookup)",
                srv.host,
                admin.port,
            )
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        await server.stop(SHUTDOWN_GRACE_S)
        if admin is not None:
            await admin.stop()
        flushed = await loop.run_in_executor(None, store.flush, FLUSH_TIMEOUT_S)
        if not flushed:
            log.warning("background disk writes did not finish within %.0f s", FLUSH_TIMEOUT_S)
        if feeder is not None:
            feeder.close()
        if index is not None:
            await loop.run_in_executor(None, index.flush, FLUSH_TIMEOUT_S)
            index.close()
        store.close()
        log.info("kvstrata serve: stopped")
