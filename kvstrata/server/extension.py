"""The server extension contract: a transport's server side, and the registry that loads it by name.

tcp is built into the server; every other transport (shm, nixl) has a :class:`ServerExtension` that the
server loads from ``server.transports`` in the config. An extension adds opcodes (0x40-0x7F) to the kvs
protocol and may supply the memory the host tier is carved from (the shm segment, NIXL-registered memory).
Its wire messages and client half live in :mod:`kvstrata.transport`; this is the half that touches the
Store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import torch

from kvstrata.core.registry import load_target
from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.store import Store
from kvstrata.server.connection import ServerConnection
from kvstrata.transport.protocol import Header

__all__ = [
    "ExtensionHandler",
    "ServerExtension",
    "register_server_extension",
    "server_extension_class",
]

#: transport name (``server.transports`` in the config) -> "module:Class" of its ServerExtension.
_SERVER_EXTENSIONS: dict[str, str] = {
    "shm": "kvstrata.server.shm:ShmServerExtension",
    "nixl": "kvstrata.server.nixl:NixlServerExtension",
}


#: A server-side handler of an extension opcode: ``await handler(connection, header, meta)``. It must read
#: (or skip) the request's payload through the connection and send exactly one reply or error.
ExtensionHandler = Callable[[ServerConnection, Header, Any], Awaitable[None]]


class ServerExtension(ABC):
    """A transport's server side, loaded by name from ``server.transports`` (tcp is built in).

    Call order: ``__init__(config)`` before the Store exists; ``host_buffer(capacity_bytes)`` (may supply
    the host tier's pool buffer, e.g. POSIX shared memory); ``attach(store)`` once the Store is built;
    ``greeting()`` for every new connection (goes into :class:`ServerHello`'s ``extensions`` under
    ``name``); ``handlers()`` once, mapping extension opcodes (0x40-0x7F, with metadata structs registered
    through :func:`kvstrata.transport.protocol.register_meta`) to coroutines; ``connection_closed(conn)``
    when a client goes away (drop its leases); ``close()`` at shutdown, after the last connection.
    A handler that raises a :class:`KVStrataError` gets a typed ERROR reply; anything else closes that
    client's connection and is logged; other clients are unaffected.
    """

    #: the transport's name ("shm", "nixl")
    name: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    def host_buffer(self, capacity_bytes: int) -> torch.Tensor | None:
        """A 1-D uint8 CPU tensor to carve the host tier from, or ``None`` to let the tier allocate."""
        return None

    @abstractmethod
    def attach(self, store: Store) -> None:
        """Called once with the server's Store."""

    def greeting(self) -> Any:
        """Data for clients of this transport (msgpack-encodable builtins), or ``None``."""
        return None

    def handlers(self) -> Mapping[int, ExtensionHandler]:
        """Extension opcode -> handler coroutine."""
        return {}

    def connection_closed(self, connection: ServerConnection) -> None:  # noqa: B027 - optional hook
        """A client connection ended: release anything it held."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the extension's resources."""


def register_server_extension(name: str, target: str) -> None:
    """Map a transport name to ``"module:Class"`` of a :class:`ServerExtension` (imported lazily)."""
    _SERVER_EXTENSIONS[name] = target


def server_extension_class(name: str) -> type[ServerExtension] | None:
    """The server extension of transport ``name``; ``None`` for ``tcp`` (built in)."""
    if name == "tcp":
        return None
    target = _SERVER_EXTENSIONS.get(name)
    if target is None:
        known = ", ".join(["tcp", *_SERVER_EXTENSIONS])
        raise InvalidArgumentError(f"unknown transport {name!r} (known: {known})")
    cls = load_target(target, "server extension")
    if not (isinstance(cls, type) and issubclass(cls, ServerExtension)):
        raise InvalidArgumentError(f"{target} is not a ServerExtension")
    return cls
