"""The one exception tree of kvstrata.

Every error kvstrata raises on purpose is a :class:`KVStrataError`. Third-party errors (OS, redis, ZMQ,
NIXL, torch) are translated at the boundary with ``raise ... from exc`` so callers catch one tree::

    KVStrataError
    ├── ConfigError                    invalid configuration value, file or environment variable
    ├── InvalidArgumentError           a bad argument to a public call (also a ValueError)
    ├── LayoutError                    a KV layout that is invalid or does not match the data
    │   └── UnsupportedLayoutError     a valid layout that an operation (kernel, tier) cannot handle
    ├── StoreError                     the tiered store
    │   ├── ChunkTooLargeError         a chunk larger than a tier's slot or capacity
    │   ├── TierFullError              no room: everything evictable is pinned, or the disk is full
    │   ├── TierIOError                a tier's medium failed (disk read/write, device copy)
    │   └── CorruptChunkError          stored bytes failed their checksum (callers see a miss)
    ├── TransportError                 moving bytes between processes or machines
    │   ├── ConnectError               the peer cannot be reached (refused, reset, DNS)
    │   ├── RequestTimeoutError        a call did not finish within its timeout
    │   ├── ProtocolError              a malformed or unexpected frame
    │   │   └── VersionMismatchError   the peer speaks another protocol version (fails at HELLO)
    │   ├── AuthenticationError        missing or wrong token
    │   └── RemoteError                the server answered with a typed error reply
    ├── BlockIndexError                the global block index
    │   └── IndexUnavailableError      the index backend (e.g. Redis) cannot be reached
    ├── KernelError                    paging/compression kernels
    │   └── ChunkFormatError           a chunk buffer whose header is missing, corrupt or of another version
    └── ConnectorError                 the vLLM connector plug-in

A miss is never an error: ``get`` returns ``None`` for a miss and raises only for a real failure.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BlockIndexError",
    "ChunkFormatError",
    "ChunkTooLargeError",
    "ConfigError",
    "ConnectError",
    "ConnectorError",
    "CorruptChunkError",
    "IndexUnavailableError",
    "InvalidArgumentError",
    "KVStrataError",
    "KernelError",
    "LayoutError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeoutError",
    "StoreError",
    "TierFullError",
    "TierIOError",
    "TransportError",
    "UnsupportedLayoutError",
    "VersionMismatchError",
]


class KVStrataError(Exception):
    """Base of every error kvstrata raises on purpose."""


class ConfigError(KVStrataError):
    """An invalid configuration value, file or environment variable."""


class InvalidArgumentError(KVStrataError, ValueError):
    """A bad argument to a public call: a key of the wrong length, a token id out of range."""


class LayoutError(KVStrataError):
    """A KV layout that is invalid, or that does not match the data it describes."""


class UnsupportedLayoutError(LayoutError):
    """A valid layout that a given operation cannot handle (say, a dtype a kernel lacks)."""


class StoreError(KVStrataError):
    """A failure of the tiered store."""


class ChunkTooLargeError(StoreError):
    """A chunk larger than a tier's slot size or total capacity."""


class TierFullError(StoreError):
    """No room in a tier: everything evictable is pinned, or the medium itself is full."""


class TierIOError(StoreError):
    """A tier's medium failed: a disk read or write, a device copy."""


class CorruptChunkError(StoreError):
    """Stored bytes failed their checksum. Tiers turn this into a miss and drop the chunk."""


class TransportError(KVStrataError):
    """A failure moving bytes between processes or machines."""


class ConnectError(TransportError):
    """The peer cannot be reached: connection refused or reset, unknown host."""


class RequestTimeoutError(TransportError):
    """A call did not finish within its timeout."""


class ProtocolError(TransportError):
    """A malformed or unexpected frame."""


class VersionMismatchError(ProtocolError):
    """The peer speaks another protocol version; raised at the handshake, never on a data read."""


class AuthenticationError(TransportError):
    """A missing or wrong token."""


class RemoteError(TransportError):
    """The server answered a request with a typed error reply."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class BlockIndexError(KVStrataError):
    """A failure of the global block index."""


class IndexUnavailableError(BlockIndexError):
    """The index backend (e.g. Redis) cannot be reached."""


class KernelError(KVStrataError):
    """A failure in the paging or compression kernels."""


class ChunkFormatError(KernelError):
    """A chunk buffer whose header is missing, corrupt, or of another format version: it cannot be decoded."""


class ConnectorError(KVStrataError):
    """A failure in the vLLM connector plug-in."""
