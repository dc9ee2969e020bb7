"""The nixl transport's server side: one NIXL agent registering the host pool and the staging slots.

The wire messages, the agent set-up and the client are in :mod:`kvstrata.transport.nixl`; NIXL itself is
imported only when the extension is attached (``server.transports`` names ``nixl``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from kvstrata.errors import ConfigError, ProtocolError, RemoteError
from kvstrata.kvstore.store import Store
from kvstrata.server import lease as ls_server
from kvstrata.server.connection import ServerConnection
from kvstrata.server.extension import ExtensionHandler, ServerExtension
from kvstrata.transport import lease as ls
from kvstrata.transport.nixl import (
    NIXL_BASE,
    STAGING_SLOTS,
    NixlAttachReply,
    NixlAttachRequest,
    new_agent,
)
from kvstrata.transport.protocol import Header

__all__ = ["NixlServerExtension"]

log = logging.getLogger(__name__)


class NixlServerExtension(ServerExtension):
    """The nixl transport's server side: one agent registering the host pool and staging slots."""

    name = "nixl"

    def __init__(
        self, config: Any, *, staging_slots: int = STAGING_SLOTS, lease_ttl_s: float | None = None
    ) -> None:
        super().__init__(config)
        self.slot_bytes = ls_server.slot_bytes_of(config)
        self.staging_slots = max(1, staging_slots)
        self.lease_ttl_s = lease_ttl_s if lease_ttl_s is not None else ls.DEFAULT_LEASE_TTL_S
        self.agent: Any = None
        self.leases: ls_server.LeaseServer | None = None
        self._regions: list[tuple[int, int]] = []
        self._registered: list[Any] = []
        self._staging: torch.Tensor | None = None
        self._peers: dict[int, str] = {}
        self._handlers: dict[int, ExtensionHandler] = {}

    def attach(self, store: Store) -> None:
        """Create the agent and register the host pool (when there is one) and the staging slots."""
        self.agent = new_agent("server")
        self._staging = torch.empty(self.staging_slots * self.slot_bytes, dtype=torch.uint8)
        self._register(self._staging)
        host = store.tier("host")
        buffer = host.memory_region() if host is not None else None
        pool_bytes = 0
        if buffer is not None and buffer.device.type == "cpu" and buffer.numel():
            self._register(buffer)
            pool_bytes = buffer.numel() * buffer.element_size()
        else:
            log.warning("nixl: no host tier to register; gets are staged (one extra copy)")
        staging = ls_server.StagingPool(self._staging, self.slot_bytes)
        base = self._staging.data_ptr()
        self.leases = ls_server.LeaseServer(
            NIXL_BASE,
            staging,
            self._address,
            lambda slot: base + slot * self.slot_bytes,
            lease_ttl_s=self.lease_ttl_s,
            max_reserved_bytes=ls_server.reservation_bound(pool_bytes, self.slot_bytes, staging.num_slots),
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

    def handlers(self) -> Mapping[int, ExtensionHandler]:
        """NIXL_ATTACH and the four lease operations."""

        async def on_attach(conn: ServerConnection, header: Header, meta: NixlAttachRequest) -> None:
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

        def lease_op(offset: int) -> ExtensionHandler:
            async def handler(conn: ServerConnection, header: Header, meta: Any) -> None:
                target = self._handlers.get(NIXL_BASE + offset)
                if target is None:
                    raise RemoteError("nixl transport not attached to a store", "unsupported")
                await target(conn, header, meta)

            return handler

        out: dict[int, ExtensionHandler] = {NIXL_BASE + ls.ATTACH: on_attach}
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

    def connection_closed(self, connection: ServerConnection) -> None:
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
