"""The ``Transport`` contract (client side) and its registry of URL schemes.

A :class:`Transport` is one client connection to one cache server, chosen by the URL scheme:
``kvs://`` (tcp), ``kvs+shm://`` (same-host shared memory), ``kvs+nixl://`` (NIXL). Every transport speaks
the kvs wire protocol (:mod:`kvstrata.transport.protocol`) over its control connection; the shm and nixl
transports move chunk bytes out of band and add their own opcodes (0x40-0x7F), which the server serves
through the extension of that transport (:mod:`kvstrata.server.extension`). Modules are imported lazily,
on first use of their scheme, so NIXL is never imported unless asked for.

Call order (one transport instance, used by one thread at a time; the client pools several)
-----------------------------------------------------------------------------------------------
1. ``Transport(address, options)`` — no I/O.
2. ``connect(timeout)`` — opens the connection and runs the HELLO handshake (version check, optional HMAC
   auth). Raises :class:`ConnectError` (unreachable), :class:`VersionMismatchError`,
   :class:`AuthenticationError`, :class:`RequestTimeoutError`.
3. Any number of ``put_many``, ``get_many``, ``exists``, ``lookup_prefix``, ``delete``, ``stats``,
   ``ping`` calls, each with a timeout in seconds.
4. ``close()`` — idempotent.

Failure semantics
-----------------
- A miss is ``None`` in ``get_many``'s result, never an exception. A chunk whose bytes fail their checksum
  is a miss too (counted in ``corrupt``).
- A per-item failure the server reports (chunk too large, tier full) is returned by ``put_many`` as an
  exception object in that item's position; the connection stays usable.
- A connection-level failure (peer gone, timeout, malformed frame) raises :class:`ConnectError`,
  :class:`RequestTimeoutError` or :class:`ProtocolError` and leaves the transport ``broken``: the caller
  discards it and connects a new one. Payload bytes already written into ``out`` buffers by a failed call
  are garbage and are never returned as a hit.
- OS errors never escape: they are translated at this boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import torch

from kvstrata.core.chunk import ChunkMeta, PrefixResult
from kvstrata.core.registry import load_target
from kvstrata.errors import InvalidArgumentError, KVStrataError

__all__ = [
    "DEFAULT_PORT",
    "PutSpec",
    "ServerAddress",
    "Transport",
    "TransportOptions",
    "parse_url",
    "register_transport",
    "transport_class",
]

DEFAULT_PORT = 7470

#: URL scheme -> "module:Class" of its Transport (imported on first use).
_TRANSPORTS: dict[str, str] = {
    "kvs": "kvstrata.transport.tcp:TcpTransport",
    "kvs+tcp": "kvstrata.transport.tcp:TcpTransport",
    "kvs+shm": "kvstrata.transport.shm:ShmTransport",
    "kvs+nixl": "kvstrata.transport.nixl:NixlTransport",
}


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """A parsed server URL: ``kvs[+transport]://host[:port]``."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        """The canonical URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_url(url: str) -> ServerAddress:
    """Parse ``kvs://host:port`` (``kvs+shm://``, ``kvs+nixl://``; a bare ``host:port`` means ``kvs``)."""
    if not isinstance(url, str) or not url:
        raise InvalidArgumentError(f"a server URL is a non-empty string, not {url!r}")
    if "://" not in url:
        url = "kvs://" + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"bad server URL {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _TRANSPORTS:
        known = ", ".join(sorted(_TRANSPORTS))
        raise InvalidArgumentError(f"unknown transport scheme {scheme!r} in {url!r} (known: {known})")
    if not parts.hostname:
        raise InvalidArgumentError(f"no host in server URL {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgumentError(f"a server URL has no path or query: {url!r}")
    return ServerAddress(scheme, parts.hostname, port if port is not None else DEFAULT_PORT)


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Per-connection settings shared by every transport."""

    token: bytes | None = None
    connect_timeout: float = 2.0
    #: send payload checksums on puts and ask for them on gets
    checksum: bool = True
    client_name: str = "kvstrata"


@dataclass(frozen=True, slots=True)
class PutSpec:
    """One chunk to put: its key, its bytes as a flat uint8 tensor, and its metadata."""

    key: bytes
    data: torch.Tensor
    meta: ChunkMeta


def register_transport(scheme: str, target: str) -> None:
    """Map a URL scheme to ``"module:Class"`` of a :class:`Transport` (imported lazily)."""
    _TRANSPORTS[scheme.lower()] = target


def transport_class(scheme: str) -> type[Transport]:
    """The Transport class for a URL scheme (imports its module now)."""
    target = _TRANSPORTS.get(scheme.lower())
    if target is None:
        raise InvalidArgumentError(f"unknown transport scheme {scheme!r}")
    cls = load_target(target, "transport")
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise InvalidArgumentError(f"{target} is not a Transport")
    return cls


class Transport(ABC):
    """One client connection to one cache server. See the module docstring for call order and failures."""

    #: the URL scheme it serves ("kvs", "kvs+shm", "kvs+nixl")
    scheme: ClassVar[str] = ""
    #: the transport name sent in HELLO and listed in the server's greeting ("tcp", "shm", "nixl")
    name: ClassVar[str] = ""

    def __init__(self, address: ServerAddress, options: TransportOptions) -> None:
        self.address = address
        self.options = options
        #: chunks whose bytes failed their checksum on arrival (returned as misses)
        self.corrupt = 0

    @property
    @abstractmethod
    def broken(self) -> bool:
        """True once the connection failed or was closed; a broken transport is discarded."""

    @property
    @abstractmethod
    def max_payload(self) -> int:
        """The largest payload the server accepts in one frame (from its greeting)."""

    @abstractmethod
    def connect(self, timeout: float) -> None:
        """Open the connection and complete the HELLO handshake."""

    @abstractmethod
    def put_many(self, items: Sequence[PutSpec], timeout: float) -> list[KVStrataError | None]:
        """Store chunks; per item ``None`` (stored) or the error the server reported for it."""

    @abstractmethod
    def get_many(
        self, keys: Sequence[bytes], outs: Sequence[torch.Tensor | None], timeout: float
    ) -> list[torch.Tensor | None]:
        """Fetch chunks (into ``outs[i]`` when given); ``None`` is a miss."""

    @abstractmethod
    def exists(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        """Whether each key is held by the server (any tier)."""

    @abstractmethod
    def lookup_prefix(self, keys: Sequence[bytes], timeout: float) -> PrefixResult:
        """How many leading keys the server holds, in one round trip."""

    @abstractmethod
    def delete(self, keys: Sequence[bytes], timeout: float) -> list[bool]:
        """Remove chunks from every tier; per key whether it was present."""

    @abstractmethod
    def stats(self, timeout: float) -> dict[str, Any]:
        """``{"tiers": {name: counters}, "server": counters}``."""

    @abstractmethod
    def ping(self, timeout: float) -> float:
        """Round-trip time in seconds."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection; idempotent."""
