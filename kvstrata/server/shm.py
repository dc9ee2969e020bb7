"""The shm transport's server side: the host pool in a POSIX shared-memory segment, leases over the
control connection (the segment, the wire messages and the client are in :mod:`kvstrata.transport.shm`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from kvstrata.errors import ConfigError, RemoteError
from kvstrata.kvstore.store import Store
from kvstrata.server import lease as ls_server
from kvstrata.server.connection import ServerConnection
from kvstrata.server.extension import ExtensionHandler, ServerExtension
from kvstrata.transport import lease as ls
from kvstrata.transport.protocol import Header
from kvstrata.transport.shm import SHM_BASE, STAGING_SLOTS, SharedSegment, ShmAttachReply

__all__ = ["ShmServerExtension"]

log = logging.getLogger(__name__)


class ShmServerExtension(ServerExtension):
    """The shm transport's server side: the host pool in a shared segment, leases over the control port."""

    name = "shm"

    def __init__(
        self, config: Any, *, staging_slots: int = STAGING_SLOTS, lease_ttl_s: float | None = None
    ) -> None:
        super().__init__(config)
        self.slot_bytes = ls_server.slot_bytes_of(config)
        self.staging_slots = max(1, staging_slots)
        self.lease_ttl_s = lease_ttl_s if lease_ttl_s is not None else ls.DEFAULT_LEASE_TTL_S
        self.segment: SharedSegment | None = None
        self.pool_bytes = 0
        self.leases: ls_server.LeaseServer | None = None
        self._handlers: dict[int, ExtensionHandler] = {}

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

    def attach(self, store: Store) -> None:
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
        host = store.tier("host")
        buffer = host.memory_region() if host is not None else None
        if buffer is None or self._offset(buffer) is None:
            log.warning("shm: the host tier is not in shared memory; gets are staged (one extra copy)")
            self.pool_bytes = 0
        seg = self.segment
        staging = ls_server.StagingPool(seg.tensor[self.pool_bytes :], self.slot_bytes)
        self.leases = ls_server.LeaseServer(
            SHM_BASE,
            staging,
            self._offset,
            lambda slot: self.pool_bytes + slot * self.slot_bytes,
            lease_ttl_s=self.lease_ttl_s,
            max_reserved_bytes=ls_server.reservation_bound(
                self.pool_bytes, self.slot_bytes, staging.num_slots
            ),
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

    def handlers(self) -> Mapping[int, ExtensionHandler]:
        """SHM_ATTACH and the four lease operations."""

        async def on_attach(conn: ServerConnection, header: Header, meta: Any) -> None:
            if self.segment is None:
                raise RemoteError("the shm transport is not available on this server", "unsupported")
            reply = ShmAttachReply(
                segment=self.segment.name, size=self.segment.size, pool_bytes=self.pool_bytes
            )
            await conn.reply(SHM_BASE + ls.ATTACH, header.request_id, reply)

        def lease_op(offset: int) -> ExtensionHandler:
            async def handler(conn: ServerConnection, header: Header, meta: Any) -> None:
                target = self._handlers.get(SHM_BASE + offset)
                if target is None:
                    raise RemoteError("the shm transport is not available on this server", "unsupported")
                await target(conn, header, meta)

            return handler

        out: dict[int, ExtensionHandler] = {SHM_BASE + ls.ATTACH: on_attach}
        for offset in (ls.GET, ls.RELEASE, ls.PUT_BEGIN, ls.PUT_COMMIT):
            out[SHM_BASE + offset] = lease_op(offset)
        return out

    def connection_closed(self, connection: ServerConnection) -> None:
        """End the connection's leases."""
        if self.leases is not None:
            self.leases.owner_closed(id(connection))

    def close(self) -> None:
        """End every lease and unlink the segment."""
        if self.leases is not None:
            self.leases.close()
        if self.segment is not None:
            self.segment.close()
