"""The kvs wire protocol: frame layout, metadata structs, limits, checksums and typed errors.

Specified byte by byte in ``docs/protocol.md``. A frame is a fixed 32-byte header, then ``meta_len`` bytes
of msgpack metadata (a map, one struct per opcode), then ``payload_len`` raw payload bytes::

    offset size field
         0    4 magic        b"KVSF"
         4    1 version      PROTOCOL_VERSION (1)
         5    1 opcode       Op
         6    2 flags        Flag bits (REPLY, CHECKSUM)
         8    8 request_id   echoed in the reply; 0 is the server greeting
        16    4 meta_len     <= MAX_META_BYTES
        20    8 payload_len  <= the peer's max payload (announced in the greeting)
        28    4 checksum     CRC-32C of the payload when Flag.CHECKSUM is set, else 0

All integers are little-endian. Everything the peer controls is bounded *before* anything is allocated:
``parse_header`` rejects bad magic, unknown opcodes and oversized lengths, ``decode_meta`` decodes at most
``MAX_META_BYTES`` with typed structs whose lists and byte strings carry length bounds.

Failure semantics: a frame that cannot be parsed means the stream is desynchronised — the reader raises
:class:`ProtocolError` and the connection is closed. A well-formed request that cannot be served gets an
ERROR reply (:class:`ErrorReply`, a code from :data:`ERROR_CODES`) and the connection stays open.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from kvstrata import errors
from kvstrata.core.chunk import EMPTY_META, ChunkMeta
from kvstrata.errors import ProtocolError, VersionMismatchError

__all__ = [
    "ERROR_CODES",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_KEYS",
    "MAX_META_BYTES",
    "PROTOCOL_VERSION",
    "ClientHello",
    "ErrorReply",
    "Flag",
    "FrameDecoder",
    "GetManyReply",
    "GetReply",
    "Header",
    "HelloReply",
    "KeyRequest",
    "KeysRequest",
    "LookupReply",
    "Op",
    "PutItem",
    "PutManyReply",
    "PutManyRequest",
    "PutRequest",
    "ServerHello",
    "StatsReply",
    "WireMeta",
    "auth_proof",
    "checksum",
    "decode_meta",
    "encode_meta",
    "error_for",
    "pack_header",
    "parse_header",
]

MAGIC = b"KVSF"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHQIQI")
HEADER_SIZE = HEADER.size  # 32
#: Largest metadata block of any frame. Metadata carries keys and small fields only, never chunk bytes.
MAX_META_BYTES = 1024 * 1024
#: Most keys in one request (GET_MANY, EXISTS, LOOKUP_PREFIX, DELETE, PUT_MANY items).
MAX_KEYS = 4096
#: Most block keys carried in one chunk's metadata.
MAX_BLOCK_KEYS = 4096
#: Hard ceiling on any payload, whatever a peer announces (a frame header field is u64).
ABSOLUTE_MAX_PAYLOAD = 1 << 32
KEY_BYTES = 16
NONCE_BYTES = 32


class Op(enum.IntEnum):
    """Opcodes. 0x40-0x7F are reserved for transport extensions (shm, nixl)."""

    HELLO = 0x01
    PING = 0x02
    PUT = 0x10
    PUT_MANY = 0x11
    GET = 0x12
    GET_MANY = 0x13
    EXISTS = 0x14
    LOOKUP_PREFIX = 0x15
    DELETE = 0x16
    STATS = 0x17
    ERROR = 0x3F


#: The first and last opcode a transport extension may define (see ``kvstrata.transport.base``).
EXTENSION_OPS = range(0x40, 0x80)
_KNOWN_OPS = frozenset(int(op) for op in Op) | frozenset(EXTENSION_OPS)


class Flag(enum.IntFlag):
    """Header flag bits; unknown bits are a protocol error."""

    REPLY = 0x0001
    CHECKSUM = 0x0002


_KNOWN_FLAGS = int(Flag.REPLY | Flag.CHECKSUM)
# Plain ints for the per-frame paths (IntFlag arithmetic builds enum members: microseconds a frame).
_REPLY = int(Flag.REPLY)
_CHECKSUM = int(Flag.CHECKSUM)

# ---- checksums -------------------------------------------------------------------------------------

try:
    from crc32c import crc32c as _crc32c

    HAVE_FAST_CHECKSUM = True
except ImportError:  # pragma: no cover - exercised only without the crc32c package
    HAVE_FAST_CHECKSUM = False
    _TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def _crc32c(data: Any, value: int = 0) -> int:  # type: ignore[misc]
        crc = value ^ 0xFFFFFFFF
        for byte in memoryview(data).cast("B"):
            crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF


def checksum(data: Any, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of a buffer, continuing from ``value``."""
    return int(_crc32c(data, value))


# ---- header ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed, validated frame header."""

    version: int
    opcode: int
    flags: int
    request_id: int
    meta_len: int
    payload_len: int
    checksum: int

    @property
    def is_reply(self) -> bool:
        """Whether the frame answers a request."""
        return bool(self.flags & _REPLY)

    @property
    def has_checksum(self) -> bool:
        """Whether ``checksum`` is the payload's CRC-32C."""
        return bool(self.flags & _CHECKSUM)


def pack_header(
    opcode: int,
    request_id: int,
    meta_len: int,
    payload_len: int = 0,
    *,
    flags: int = 0,
    checksum: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """The 32 header bytes of a frame."""
    return HEADER.pack(MAGIC, version, opcode, flags, request_id, meta_len, payload_len, checksum)


def parse_header(data: Any, max_payload: int, *, expect_version: int | None = PROTOCOL_VERSION) -> Header:
    """Parse and bound-check 32 header bytes; raises :class:`ProtocolError` on anything malformed.

    ``expect_version=None`` accepts any version (the handshake checks it itself and reports a mismatch
    as :class:`VersionMismatchError`).
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"truncated frame header: {len(data)} of {HEADER_SIZE} bytes")
    magic, version, opcode, flags, request_id, meta_len, payload_len, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}: not a kvs stream or desynchronised")
    if expect_version is not None and version != expect_version:
        raise VersionMismatchError(
            f"peer speaks kvs protocol version {version}, this side speaks {expect_version}"
        )
    if opcode not in _KNOWN_OPS:
        raise ProtocolError(f"unknown opcode 0x{opcode:02x}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flag bits 0x{flags:04x}")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"metadata of {meta_len} bytes exceeds the {MAX_META_BYTES}-byte limit")
    if payload_len > min(max_payload, ABSOLUTE_MAX_PAYLOAD):
        raise ProtocolError(f"payload of {payload_len} bytes exceeds the {max_payload}-byte limit")
    if not flags & _CHECKSUM and crc != 0:
        raise ProtocolError("checksum field set without the CHECKSUM flag")
    return Header(version, opcode, flags, request_id, meta_len, payload_len, crc)


# ---- metadata structs ------------------------------------------------------------------------------

Key = Annotated[bytes, msgspec.Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
KeyList = Annotated[list[Key], msgspec.Meta(max_length=MAX_KEYS)]
Nonce = Annotated[bytes, msgspec.Meta(max_length=64)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]
Size = Annotated[int, msgspec.Meta(ge=0, le=ABSOLUTE_MAX_PAYLOAD)]
Crc = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
#: a size, or -1 (a miss) or -2 (deferred: the reply's payload budget ran out; ask again)
SignedSize = Annotated[int, msgspec.Meta(ge=-2, le=ABSOLUTE_MAX_PAYLOAD)]


class _Meta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every metadata struct: msgpack maps, unknown fields ignored (forward compatible)."""


class WireMeta(_Meta):
    """A chunk's metadata on the wire (mirrors :class:`kvstrata.kvstore.tier.ChunkMeta`)."""

    block_keys: Annotated[list[Key], msgspec.Meta(max_length=MAX_BLOCK_KEYS)] = []
    fingerprint: Annotated[bytes, msgspec.Meta(max_length=64)] = b""
    codec: Annotated[str, msgspec.Meta(max_length=16)] = "none"
    num_tokens: Annotated[int, msgspec.Meta(ge=0, le=1 << 40)] = 0


_NO_META = WireMeta()


def wire_meta(meta: ChunkMeta) -> WireMeta:
    """A chunk's stored metadata as it goes on the wire (the checksum travels in its own field)."""
    if meta is EMPTY_META:
        return _NO_META  # shared: only ever encoded
    return WireMeta(
        block_keys=list(meta.block_keys),
        fingerprint=meta.fingerprint,
        codec=meta.codec,
        num_tokens=meta.num_tokens,
    )


def chunk_meta(meta: WireMeta, crc32c: int = -1) -> ChunkMeta:
    """The stored metadata of a chunk put over the wire; ``crc32c``: its payload's CRC-32C once checked
    (kept with the chunk so that gets need not read it again to checksum it), -1 when not."""
    return ChunkMeta(
        block_keys=tuple(meta.block_keys),
        fingerprint=meta.fingerprint,
        codec=meta.codec,
        num_tokens=meta.num_tokens,
        crc32c=crc32c,
    )


class ServerHello(_Meta):
    """The server's greeting, sent unprompted on connect (opcode HELLO, request id 0)."""

    version: int
    server: ShortText = ""
    nonce: Nonce = b""
    auth: bool = False
    max_payload: Size = 0
    max_keys: int = MAX_KEYS
    transports: Annotated[list[ShortText], msgspec.Meta(max_length=16)] = []
    #: per-extension data (an shm segment name, a NIXL agent's metadata), keyed by transport name
    extensions: dict[ShortText, Any] = {}


class ClientHello(_Meta):
    """The client's answer to the greeting: its version and, with auth, its HMAC proof."""

    version: int
    client: ShortText = ""
    nonce: Nonce = b""
    proof: Nonce = b""
    transport: ShortText = "tcp"


class HelloReply(_Meta):
    """The server accepts the session; ``proof`` lets a client with a token authenticate the server."""

    proof: Nonce = b""


class Empty(_Meta):
    """No metadata (PING, STATS requests; PUT, PING replies)."""


class KeyRequest(_Meta):
    """GET: one key."""

    key: Key


class PutRequest(_Meta):
    """PUT: one chunk; the payload is its bytes."""

    key: Key
    meta: WireMeta = msgspec.field(default_factory=WireMeta)


class PutItem(_Meta):
    """One chunk of a PUT_MANY; payloads are concatenated in item order."""

    key: Key
    size: Size
    checksum: Crc = 0
    meta: WireMeta = msgspec.field(default_factory=WireMeta)


class PutManyRequest(_Meta):
    """PUT_MANY: several chunks in one frame."""

    items: Annotated[list[PutItem], msgspec.Meta(max_length=MAX_KEYS)]


class PutManyReply(_Meta):
    """Per item: "" when stored, else an error code from :data:`ERROR_CODES`."""

    results: Annotated[list[ShortText], msgspec.Meta(max_length=MAX_KEYS)]


class GetReply(_Meta):
    """GET reply: ``found`` false is a miss (no payload); else the payload is the chunk."""

    found: bool
    meta: WireMeta = msgspec.field(default_factory=WireMeta)


class KeysRequest(_Meta):
    """GET_MANY, EXISTS, LOOKUP_PREFIX, DELETE: a list of keys."""

    keys: KeyList


class GetManyReply(_Meta):
    """GET_MANY reply: per key its size (-1: miss) and CRC-32C; hits' bytes concatenated in key order."""

    sizes: Annotated[list[SignedSize], msgspec.Meta(max_length=MAX_KEYS)]
    checksums: Annotated[list[Crc], msgspec.Meta(max_length=MAX_KEYS)] = []


class ExistsReply(_Meta):
    """EXISTS reply: one flag per key."""

    present: Annotated[list[bool], msgspec.Meta(max_length=MAX_KEYS)]


class DeleteReply(_Meta):
    """DELETE reply: one flag per key, true when it was present."""

    removed: Annotated[list[bool], msgspec.Meta(max_length=MAX_KEYS)]


class LookupReply(_Meta):
    """LOOKUP_PREFIX reply: how many leading keys are held, and the highest tier of each."""

    num_chunks: Annotated[int, msgspec.Meta(ge=0, le=MAX_KEYS)]
    tiers: Annotated[list[ShortText], msgspec.Meta(max_length=MAX_KEYS)] = []


class StatsReply(_Meta):
    """STATS reply: per-tier counters (TierStats fields) and server counters."""

    tiers: dict[ShortText, dict[ShortText, int]] = {}
    server: dict[ShortText, int] = {}


class ErrorReply(_Meta):
    """A typed error answering one request."""

    code: ShortText
    message: ShortText = ""


#: Error codes and the exception a client raises for each.
ERROR_CODES: dict[str, type[errors.KVStrataError]] = {
    "protocol": errors.ProtocolError,
    "version_mismatch": errors.VersionMismatchError,
    "auth": errors.AuthenticationError,
    "invalid_argument": errors.InvalidArgumentError,
    "too_large": errors.ChunkTooLargeError,
    "full": errors.TierFullError,
    "io": errors.TierIOError,
    "corrupt": errors.ProtocolError,
    "unsupported": errors.RemoteError,
    "busy": errors.RemoteError,
    "internal": errors.RemoteError,
}


def error_code(exc: BaseException) -> str:
    """The wire error code of an exception (the inverse of :data:`ERROR_CODES`)."""
    for code, cls in ERROR_CODES.items():
        if type(exc) is cls:
            return code
    if isinstance(exc, errors.VersionMismatchError):
        return "version_mismatch"
    if isinstance(exc, errors.ProtocolError):
        return "protocol"
    if isinstance(exc, errors.AuthenticationError):
        return "auth"
    if isinstance(exc, errors.InvalidArgumentError):
        return "invalid_argument"
    for code in ("too_large", "full", "io"):
        if isinstance(exc, ERROR_CODES[code]):
            return code
    return "internal"


def error_for(reply: ErrorReply) -> errors.KVStrataError:
    """The exception a client raises for an ERROR reply."""
    cls = ERROR_CODES.get(reply.code, errors.RemoteError)
    message = f"server error [{reply.code}]: {reply.message}"
    if cls is errors.RemoteError:
        return errors.RemoteError(message, reply.code)
    return cls(message)


#: The metadata struct of each (opcode, is_reply).
_REQUEST_TYPES: dict[int, type[msgspec.Struct]] = {
    Op.HELLO: ClientHello,
    Op.PING: Empty,
    Op.PUT: PutRequest,
    Op.PUT_MANY: PutManyRequest,
    Op.GET: KeyRequest,
    Op.GET_MANY: KeysRequest,
    Op.EXISTS: KeysRequest,
    Op.LOOKUP_PREFIX: KeysRequest,
    Op.DELETE: KeysRequest,
    Op.STATS: Empty,
    Op.ERROR: ErrorReply,
}
_REPLY_TYPES: dict[int, type[msgspec.Struct]] = {
    Op.HELLO: HelloReply,
    Op.PING: Empty,
    Op.PUT: Empty,
    Op.PUT_MANY: PutManyReply,
    Op.GET: GetReply,
    Op.GET_MANY: GetManyReply,
    Op.EXISTS: ExistsReply,
    Op.LOOKUP_PREFIX: LookupReply,
    Op.DELETE: DeleteReply,
    Op.STATS: StatsReply,
    Op.ERROR: ErrorReply,
}
_DECODERS: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}
_ENCODER = msgspec.msgpack.Encoder()


def _decoder(kind: type[Any]) -> msgspec.msgpack.Decoder[Any]:
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.msgpack.Decoder(kind)
    return dec


def register_meta(opcode: int, request: type[msgspec.Struct], reply: type[msgspec.Struct]) -> None:
    """Declare the metadata structs of an extension opcode (0x40-0x7F); called by transport extensions."""
    if opcode not in EXTENSION_OPS:
        raise ValueError(f"extension opcodes are 0x40-0x7f, not 0x{opcode:02x}")
    _REQUEST_TYPES[opcode] = request
    _REPLY_TYPES[opcode] = reply


def encode_meta(meta: msgspec.Struct) -> bytes:
    """Encode a metadata struct to msgpack."""
    return _ENCODER.encode(meta)


def decode_meta(opcode: int, is_reply: bool, data: Any, *, kind: type[Any] | None = None) -> Any:
    """Decode and validate the metadata of a frame; raises :class:`ProtocolError` if it is malformed.

    An ERROR frame always decodes as :class:`ErrorReply`. ``kind`` overrides the opcode's struct (the
    server greeting is a HELLO frame with a :class:`ServerHello`).
    """
    if len(data) > MAX_META_BYTES:
        raise ProtocolError(f"metadata of {len(data)} bytes exceeds the {MAX_META_BYTES}-byte limit")
    if kind is None:
        table = _REPLY_TYPES if is_reply else _REQUEST_TYPES
        kind = ErrorReply if opcode == Op.ERROR else table.get(opcode)
        if kind is None:
            raise ProtocolError(f"no metadata schema for opcode 0x{opcode:02x}")
    try:
        return _decoder(kind).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError) as exc:
        # msgspec raises UnicodeDecodeError (a ValueError) for invalid UTF-8 in a str field.
        raise ProtocolError(f"malformed metadata for opcode 0x{opcode:02x}: {exc}") from exc


# ---- auth ------------------------------------------------------------------------------------------

_CLIENT_DOMAIN = b"kvstrata-auth-v1 client\x00"
_SERVER_DOMAIN = b"kvstrata-auth-v1 server\x00"


def auth_proof(token: bytes, first_nonce: bytes, second_nonce: bytes, *, server: bool) -> bytes:
    """HMAC-SHA256 proof of the shared token over both nonces (domain-separated per direction).

    The client proves ``auth_proof(token, server_nonce, client_nonce, server=False)``; the server answers
    with ``auth_proof(token, client_nonce, server_nonce, server=True)``.
    """
    domain = _SERVER_DOMAIN if server else _CLIENT_DOMAIN
    return hmac.new(token, domain + first_nonce + second_nonce, hashlib.sha256).digest()


# ---- an incremental decoder (small frames; the fuzzing target) ----------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole decoded frame (metadata decoded; payload as bytes — for small frames only)."""

    header: Header
    meta: Any
    payload: bytes


class FrameDecoder:
    """Incremental decoder of a byte stream into :class:`Frame` objects.

    ``feed(data)`` returns the frames completed so far. Anything malformed raises :class:`ProtocolError`
    and leaves the decoder failed (every later call raises): the stream is desynchronised. Payload
    checksums are verified when flagged. Used for control traffic and by the tests; the data paths read
    payloads straight into their destinations instead.
    """

    def __init__(self, max_payload: int, *, replies: bool) -> None:
        self._max_payload = max_payload
        self._replies = replies
        self._buf = bytearray()
        self._header: Header | None = None
        self._failed: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data`` and return the frames it completes."""
        if self._failed is not None:
            raise ProtocolError("decoder already failed: stream desynchronised") from self._failed
        self._buf += data
        try:
            return list(self._drain())
        except ProtocolError as exc:
            self._failed = exc
            self._buf.clear()
            raise

    def _drain(self) -> Iterator[Frame]:
        while True:
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    return
                self._header = parse_header(self._buf[:HEADER_SIZE], self._max_payload)
                if self._header.is_reply != self._replies and self._header.opcode != Op.ERROR:
                    raise ProtocolError("a request where a reply was expected, or the reverse")
            header = self._header
            total = HEADER_SIZE + header.meta_len + header.payload_len
            if len(self._buf) < total:
                return
            meta_end = HEADER_SIZE + header.meta_len
            meta = decode_meta(header.opcode, header.is_reply, bytes(self._buf[HEADER_SIZE:meta_end]))
            payload = bytes(self._buf[meta_end:total])
            if header.has_checksum and checksum(payload) != header.checksum:
                raise ProtocolError("payload checksum mismatch")
            del self._buf[:total]
            self._header = None
            yield Frame(header, meta, payload)
