"""The nixl transport (``kvs+nixl://``): chunk bytes move with NIXL READ/WRITE (UCX backend).

The server runs one long-lived NIXL agent that registers its host pool and a few staging slots. A client
connects over the usual kvs control connection (HELLO, auth), then sends ``NIXL_ATTACH`` with its agent's
metadata and receives the server agent's (both sides load the other's, so UCX can wire up either way).
Gets and puts then follow :mod:`kvstrata.transport.lease`: the server pins a chunk and returns its address,
the client READs it straight into the destination tensor (registered for the transfer) and releases the
lease; a put is WRITTEN straight into a slot reserved in the host pool and committed there (a staging
slot and one server-side copy only when no pool slot can be reserved). On a CPU-only machine UCX moves the
bytes with TCP and cross-memory attach (DRAM to DRAM); with RDMA NICs and GPU memory the same code path uses
them.

Opcodes (see ``docs/protocol.md``, "nixl"): ``0x50`` NIXL_ATTACH, ``0x51`` LEASE_GET, ``0x52`` RELEASE,
``0x53`` PUT_BEGIN, ``0x54`` PUT_COMMIT.

NIXL is an optional dependency (``pip install kvstrata[nixl]``) imported on first use. Agents are created
once per process and kept for its lifetime: creating and destroying UCX agents repeatedly is slow, and
NIXL's library teardown at interpreter exit has been seen to crash, so long-lived processes are assumed.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec
import torch

from kvstrata.errors import ConfigError, ConnectError, ProtocolError, RemoteError, RequestTimeoutError
from kvstrata.transport import lease as ls
from kvstrata.transport import protocol as p
from kvstrata.transport.base import ServerExtension
from kvstrata.transport.protocol import Header

__all__ = ["NIXL_BASE", "NixlAttachReply", "NixlAttachRequest", "NixlServerExtension", "NixlTransport"]

log = logging.getLogger(__name__)

NIXL_BASE = 0x50
#: Staging slots registered beside the host pool (puts, and gets of chunks held outside the host pool).
STAGING_SLOTS = 32
#: Bound on an agent's metadata blob (a few hundred bytes with UCX over TCP; more with many NICs).
MAX_AGENT_METADATA = 256 * 1024

AgentMetadata = Annotated[bytes, msgspec.Meta(max_length=MAX_AGENT_METADATA)]


class NixlAttachRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """NIXL_ATTACH: the client agent's metadata."""

    agent: AgentMetadata


class NixlAttachReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """NIXL_ATTACH reply: the server agent's metadata (with its registered memory)."""

    agent: AgentMetadata


p.register_meta(NIXL_BASE + ls.ATTACH, NixlAttachRequest, NixlAttachReply)
ls.register_lease_ops(NIXL_BASE)


def _import_nixl() -> tuple[Any, Any]:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as exc:  # ImportError, or a broken native library
        raise ConfigError(
            f"the nixl transport needs the 'nixl' package (pip install kvstrata[nixl]): {exc}"
        ) from exc
    return nixl_agent, nixl_agent_config


#: Microseconds the agent's progress thread sleeps between polls. NIXL's Python wrapper fixes it at 0, a
#: thread spinning a whole core for as long as the agent lives (an idle server included).
PROGRESS_DELAY_US = 100
_agent_lock = threading.Lock()


def _new_agent(role: str) -> Any:
    nixl_agent, nixl_agent_config = _import_nixl()
    name = f"kvstrata-{role}-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        import nixl._api as api

        bindings = api.nixlBind
        base = bindings.nixlAgentConfig
    except Exception:  # a layout this does not know: NIXL's own defaults
        bindings = base = None
    with _agent_lock:
        if bindings is not None:
            bindings.nixlAgentConfig = _paced_config(base)
        try:
            return nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        except Exception as exc:
            raise ConfigError(f"cannot create a NIXL agent with the UCX backend: {exc}") from exc
        finally:
            if bindings is not None:
                bindings.nixlAgentConfig = base


def _paced_config(base: Any) -> Any:
    """A subclass of NIXL's agent config whose progress-thread delay is at least ``PROGRESS_DELAY_US``."""

    class PacedConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:  # NIXL's attribute name
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:
            base.pthrDelay.__set__(self, max(int(value), PROGRESS_DELAY_US))

    return PacedConfig


class NixlServerExtension(ServerExtension):
    """The nixl transport's server side: one agent registering the host pool and staging slots."""

    name = "nixl"

    def __init__(
        self, config: Any, *, staging_slots: int = STAGING_SLOTS, lease_ttl_s: float | None = None
    ) -> None:
        super().__init__(config)
        self.slot_bytes = ls.slot_bytes_of(config)
        self.staging_slots = max(1, staging_slots)
        self.lease_ttl_s = lease_ttl_s if lease_ttl_s is not None else ls.DEFAULT_LEASE_TTL_S
        self.agent: Any = None
        self.leases: ls.LeaseServer | None = None
        self._regions: list[tuple[int, int]] = []
        self._registered: list[Any] = []
        self._staging: torch.Tensor | None = None
        self._peers: dict[int, str] = {}
        self._handlers: dict[int, Any] = {}

    def attach(self, store: Any) -> None:
        """Create the agent and register the host pool (when there is one) and the staging slots."""
        self.agent = _new_agent("server")
        self._staging = torch.empty(self.staging_slots * self.slot_bytes, dtype=torch.uint8)
        self._register(self._staging)
        host = store.tier("host") if hasattr(store, "tier") else None
        buffer = getattr(host, "buffer", None)
        pool_bytes = 0
        if isinstance(buffer, torch.Tensor) and buffer.device.type == "cpu" and buffer.numel():
            self._register(buffer)
            pool_bytes = buffer.numel() * buffer.element_size()
        else:
            log.warning("nixl: no host tier to register; gets are staged (one extra copy)")
        staging = ls.StagingPool(self._staging, self.slot_bytes)
        base = self._staging.data_ptr()
        self.leases = ls.LeaseServer(
            NIXL_BASE,
            staging,
            self._address,
            lambda slot: base + slot * self.slot_bytes,
            lease_ttl_s=self.lease_ttl_s,
            max_reserved_bytes=ls.reservation_bound(pool_bytes, self.slot_bytes, staging.num_slots),
        )
        self._handlers = dict(self.leases.handlers())
        log.info("nixl: agent %s registered %d bytes", self.agent.name, sum(n for _, n in self._regions))

    def _register(self, tensor: torch.Tensor) -> None:
        try:
            self._registered.append(self.agent.register_memory(tensor))
        except Exception as exc:
            raise ConfigError(f"nixl: registering {tensor.numel()} bytes failed: {exc}") from exc
        self._regions.append((tensor.data_ptr(), tensor.numel()))

    def _address(self, data: torch.Tensor) -> int | None:
        """The address of ``data`` when it lies inside registered host-pool memory, else ``None``."""
        ptr = data.data_ptr()
        end = ptr + data.numel() * data.element_size()
        for start, length in self._regions[1:]:  # region 0 is staging: chunks never live there
            if start <= ptr and end <= start + length:
                return ptr
        return None

    def handlers(self) -> Mapping[int, Any]:
        """NIXL_ATTACH and the four lease operations."""

        async def on_attach(conn: Any, header: Header, meta: NixlAttachRequest) -> None:
            if self.agent is None:
                raise RemoteError("nixl transport not attached to a store", "unsupported")
            try:
                peer = self.agent.add_remote_agent(meta.agent)
            except Exception as exc:
                raise ProtocolError(f"unusable NIXL agent metadata: {exc}") from exc
            old = self._peers.get(id(conn))
            if old is not None and old != peer:
                self._forget(old)
            self._peers[id(conn)] = peer
            reply = NixlAttachReply(agent=self.agent.get_agent_metadata())
            await conn.reply(NIXL_BASE + ls.ATTACH, header.request_id, reply)

        def lease_op(offset: int) -> Any:
            async def handler(conn: Any, header: Header, meta: Any) -> None:
                target = self._handlers.get(NIXL_BASE + offset)
                if target is None:
                    raise RemoteError("nixl transport not attached to a store", "unsupported")
                await target(conn, header, meta)

            return handler

        out: dict[int, Any] = {NIXL_BASE + ls.ATTACH: on_attach}
        for offset in (ls.GET, ls.RELEASE, ls.PUT_BEGIN, ls.PUT_COMMIT):
            out[NIXL_BASE + offset] = lease_op(offset)
        return out

    def _forget(self, peer: Any) -> None:
        if peer in self._peers.values():
            return  # another connection of the same client agent still uses it
        try:
            self.agent.remove_remote_agent(peer)
        except Exception as exc:
            log.debug("nixl: removing agent %r: %s", peer, exc)

    def connection_closed(self, connection: Any) -> None:
        """End the connection's leases and forget its agent when no other connection shares it."""
        if self.leases is not None:
            self.leases.owner_closed(id(connection))
        peer = self._peers.pop(id(connection), None)
        if peer is not None and self.agent is not None:
            self._forget(peer)

    def close(self) -> None:
        """End every lease and deregister memory (the agent itself lives as long as the process)."""
        if self.leases is not None:
            self.leases.close()
        for reg in self._registered:
            try:
                self.agent.deregister_memory(reg)
            except Exception as exc:
                log.debug("nixl: deregistering memory: %s", exc)
        self._registered.clear()
        self._regions.clear()


class _ClientAgent:
    """The process-wide client agent: created on first use, shared by every nixl transport, never freed."""

    _lock = threading.Lock()
    _agent: Any = None
    #: server agents whose metadata the client agent has loaded
    _known: set[str] = set()

    @classmethod
    def get(cls) -> Any:
        with cls._lock:
            if cls._agent is None:
                cls._agent = _new_agent("client")
            return cls._agent


class NixlTransport(ls.LeaseTransport):
    """``kvs+nixl://host:port``: the kvs control connection plus NIXL READ/WRITE of chunk bytes."""

    scheme = "kvs+nixl"
    name = "nixl"
    base = NIXL_BASE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agent: Any = None
        self.peer: str | None = None

    def _attach(self) -> None:
        agent = _ClientAgent.get()
        op = NIXL_BASE + ls.ATTACH
        rid = self._request(op, NixlAttachRequest(agent=agent.get_agent_metadata()))
        _, reply = self._reply(rid, op)
        with _ClientAgent._lock:
            try:
                peer = agent.add_remote_agent(reply.agent)
            except Exception as exc:
                raise ProtocolError(f"{self.address}: unusable NIXL agent metadata: {exc}") from exc
            _ClientAgent._known.add(peer)
        self.agent = agent
        self.peer = peer.decode() if isinstance(peer, bytes) else peer

    def _transfer(self, op: str, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        """One NIXL request moving every span (local tensors registered for its duration)."""
        spans = [(pos, t) for pos, t in spans if t.numel()]
        if not spans:
            return
        agent = self.agent
        if agent is None or self.peer is None:
            raise ConnectError(f"{self.address}: not attached")
        tensors = [t for _, t in spans]
        with _ClientAgent._lock:
            try:
                reg = agent.register_memory(tensors)
            except Exception as exc:
                raise ConnectError(f"{self.address}: NIXL memory registration failed: {exc}") from exc
            try:
                local = agent.get_xfer_descs(tensors)
                remote = agent.get_xfer_descs([(pos, t.numel(), 0) for pos, t in spans], "DRAM")
                handle = agent.initialize_xfer(op, local, remote, self.peer)
                try:
                    state = agent.transfer(handle)
                    while state == "PROC":
                        if time.monotonic() >= self._deadline:
                            raise RequestTimeoutError(f"{self.address}: NIXL {op} did not finish in time")
                        state = agent.check_xfer_state(handle)
                    if state != "DONE":
                        raise ConnectError(f"{self.address}: NIXL {op} failed ({state})")
                finally:
                    try:
                        agent.release_xfer_handle(handle)
                    except Exception as exc:
                        log.debug("nixl: releasing a transfer: %s", exc)
            except (ConnectError, RequestTimeoutError):
                raise
            except Exception as exc:
                raise ConnectError(f"{self.address}: NIXL {op} failed: {exc}") from exc
            finally:
                try:
                    agent.deregister_memory(reg)
                except Exception as exc:
                    log.debug("nixl: deregistering: %s", exc)

    def _read_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        self._transfer("READ", spans)

    def _write_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        self._transfer("WRITE", spans)
