"""The wire protocol: header layout, limits, metadata schemas, checksums, auth, and a fuzzed decoder."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstrata import errors
from kvstrata.transport import protocol as p

KEY = bytes(range(16))
MAX_PAYLOAD = 1 << 20


def frame(
    opcode: int, meta: msgspec.Struct, payload: bytes = b"", *, reply: bool = False, rid: int = 7
) -> bytes:
    raw = p.encode_meta(meta)
    flags = p.Flag.REPLY if reply else 0
    crc = 0
    if payload:
        flags |= p.Flag.CHECKSUM
        crc = p.checksum(payload)
    return p.pack_header(opcode, rid, len(raw), len(payload), flags=flags, checksum=crc) + raw + payload


def test_header_is_32_bytes_little_endian() -> None:
    raw = p.pack_header(p.Op.GET, 0x0102030405060708, 9, 10, flags=p.Flag.CHECKSUM, checksum=0xAABBCCDD)
    assert len(raw) == p.HEADER_SIZE == 32
    assert raw[:4] == b"KVSF" and raw[4] == p.PROTOCOL_VERSION and raw[5] == 0x12
    assert struct.unpack_from("<H", raw, 6)[0] == 2
    assert struct.unpack_from("<Q", raw, 8)[0] == 0x0102030405060708
    assert struct.unpack_from("<I", raw, 16)[0] == 9
    assert struct.unpack_from("<Q", raw, 20)[0] == 10
    assert struct.unpack_from("<I", raw, 28)[0] == 0xAABBCCDD
    header = p.parse_header(raw, MAX_PAYLOAD)
    assert (header.opcode, header.request_id, header.meta_len, header.payload_len) == (
        p.Op.GET,
        0x0102030405060708,
        9,
        10,
    )
    assert header.has_checksum and not header.is_reply


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:5] + bytes([0x30]) + b[6:], "opcode"),
        (lambda b: b[:6] + struct.pack("<H", 0x100) + b[8:], "flag"),
        (lambda b: b[:16] + struct.pack("<I", p.MAX_META_BYTES + 1) + b[20:], "metadata"),
        (lambda b: b[:20] + struct.pack("<Q", MAX_PAYLOAD + 1) + b[28:], "payload"),
        (lambda b: b[:28] + struct.pack("<I", 5), "checksum"),
        (lambda b: b[:20], "truncated"),
    ],
)
def test_malformed_headers_are_protocol_errors(mutate: object, message: str) -> None:
    good = p.pack_header(p.Op.PING, 1, 0)
    with pytest.raises(errors.ProtocolError, match=message):
        p.parse_header(mutate(good), MAX_PAYLOAD)  # type: ignore[operator]


def test_version_mismatch_is_its_own_error() -> None:
    raw = p.pack_header(p.Op.HELLO, 0, 0, version=p.PROTOCOL_VERSION + 1)
    with pytest.raises(errors.VersionMismatchError, match="version 2"):
        p.parse_header(raw, MAX_PAYLOAD)
    assert p.parse_header(raw, MAX_PAYLOAD, expect_version=None).version == p.PROTOCOL_VERSION + 1


def test_metadata_round_trips() -> None:
    cases: list[tuple[int, bool, msgspec.Struct]] = [
        (p.Op.HELLO, False, p.ClientHello(version=1, client="t", nonce=b"n" * 32, proof=b"p" * 32)),
        (p.Op.PUT, False, p.PutRequest(key=KEY, meta=p.WireMeta(block_keys=[KEY], num_tokens=3))),
        (p.Op.PUT_MANY, False, p.PutManyRequest(items=[p.PutItem(key=KEY, size=5, checksum=9)])),
        (p.Op.PUT_MANY, True, p.PutManyReply(results=["", "too_large"])),
        (p.Op.GET, True, p.GetReply(found=True, meta=p.WireMeta(codec="int8"))),
        (p.Op.GET_MANY, True, p.GetManyReply(sizes=[3, -1, -2], checksums=[1, 0, 0])),
        (p.Op.LOOKUP_PREFIX, True, p.LookupReply(num_chunks=2, tiers=["host", "disk"])),
        (p.Op.STATS, True, p.StatsReply(tiers={"host": {"hits": 1}}, server={"connections": 2})),
        (p.Op.ERROR, True, p.ErrorReply(code="full", message="no room")),
    ]
    for opcode, reply, meta in cases:
        assert p.decode_meta(opcode, reply, p.encode_meta(meta)) == meta


@pytest.mark.parametrize(
    "raw",
    [
        msgspec.msgpack.encode({"key": b"short"}),
        msgspec.msgpack.encode({"key": "a string, not bytes"}),
        msgspec.msgpack.encode({}),
        msgspec.msgpack.encode([1, 2, 3]),
        b"\xc1",
        b"",
    ],
)
def test_malformed_metadata_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        p.decode_meta(p.Op.GET, False, raw)


def test_counts_are_bounded() -> None:
    too_many = msgspec.msgpack.encode({"keys": [KEY] * (p.MAX_KEYS + 1)})
    with pytest.raises(errors.ProtocolError):
        p.decode_meta(p.Op.GET_MANY, False, too_many)
    fine = msgspec.msgpack.encode({"keys": [KEY] * p.MAX_KEYS})
    assert len(p.decode_meta(p.Op.GET_MANY, False, fine).keys) == p.MAX_KEYS
    with pytest.raises(errors.ProtocolError):
        p.decode_meta(p.Op.GET_MANY, False, b"\x00" * (p.MAX_META_BYTES + 1))


def test_checksum_is_crc32c() -> None:
    assert p.checksum(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert p.checksum(b"6789", p.checksum(b"12345")) == 0xE3069283
    assert p.checksum(memoryview(bytearray(b"123456789"))) == 0xE3069283


def test_auth_proofs_are_direction_bound() -> None:
    a, b = b"a" * 32, b"b" * 32
    client = p.auth_proof(b"token", a, b, server=False)
    server = p.auth_proof(b"token", b, a, server=True)
    assert client != server and len(client) == 32
    assert client != p.auth_proof(b"other", a, b, server=False)
    assert client == p.auth_proof(b"token", a, b, server=False)


def test_error_codes_map_to_the_exception_tree() -> None:
    assert isinstance(p.error_for(p.ErrorReply(code="auth")), errors.AuthenticationError)
    assert isinstance(p.error_for(p.ErrorReply(code="too_large")), errors.ChunkTooLargeError)
    assert isinstance(p.error_for(p.ErrorReply(code="version_mismatch")), errors.VersionMismatchError)
    unknown = p.error_for(p.ErrorReply(code="weird", message="m"))
    assert isinstance(unknown, errors.RemoteError) and unknown.code == "weird"


def _stream() -> bytes:
    return b"".join(
        [
            frame(p.Op.GET, p.GetReply(found=True), b"payload-bytes" * 3, reply=True, rid=1),
            frame(p.Op.GET, p.GetReply(found=False), reply=True, rid=2),
            frame(p.Op.EXISTS, p.ExistsReply(present=[True, False]), reply=True, rid=3),
            frame(p.Op.ERROR, p.ErrorReply(code="io", message="disk"), reply=True, rid=4),
        ]
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_decoder_handles_any_split(cuts: list[int]) -> None:
    stream = _stream()
    points = sorted({min(c, len(stream)) for c in cuts})
    decoder = p.FrameDecoder(MAX_PAYLOAD, replies=True)
    frames = []
    last = 0
    for point in [*points, len(stream)]:
        frames += decoder.feed(stream[last:point])
        last = point
    assert [f.header.request_id for f in frames] == [1, 2, 3, 4]
    assert frames[0].payload == b"payload-bytes" * 3
    assert frames[1].meta == p.GetReply(found=False)


def _frame_ends() -> list[int]:
    ends, total = [], 0
    for part in (
        frame(p.Op.GET, p.GetReply(found=True), b"payload-bytes" * 3, reply=True, rid=1),
        frame(p.Op.GET, p.GetReply(found=False), reply=True, rid=2),
        frame(p.Op.EXISTS, p.ExistsReply(present=[True, False]), reply=True, rid=3),
        frame(p.Op.ERROR, p.ErrorReply(code="io", message="disk"), reply=True, rid=4),
    ):
        total += len(part)
        ends.append(total)
    return ends


@settings(max_examples=40, deadline=None)
@given(length=st.integers(min_value=0, max_value=220))
def test_truncated_stream_yields_only_whole_frames(length: int) -> None:
    stream = _stream()
    decoder = p.FrameDecoder(MAX_PAYLOAD, replies=True)
    frames = decoder.feed(stream[:length])
    assert len(frames) == sum(1 for end in _frame_ends() if end <= length)


@settings(max_examples=150, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=10_000),
    value=st.integers(min_value=0, max_value=255),
    extra=st.binary(max_size=64),
)
def test_mutated_stream_decodes_or_fails_typed(position: int, value: int, extra: bytes) -> None:
    stream = bytearray(_stream())
    stream[position % len(stream)] = value
    decoder = p.FrameDecoder(MAX_PAYLOAD, replies=True)
    try:
        frames = decoder.feed(bytes(stream) + extra)
    except errors.ProtocolError:
        with pytest.raises(errors.ProtocolError):
            decoder.feed(b"more")  # a failed decoder stays failed: the stream is desynchronised
        return
    for f in frames:
        assert f.header.meta_len <= p.MAX_META_BYTES
        assert f.header.payload_len <= MAX_PAYLOAD


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    decoder = p.FrameDecoder(MAX_PAYLOAD, replies=False)
    try:
        decoder.feed(data)
    except errors.ProtocolError:
        pass


@settings(max_examples=60, deadline=None)
@given(meta_len=st.integers(min_value=0, max_value=2**32 - 1), payload_len=st.integers(0, 2**64 - 1))
def test_oversized_lengths_are_refused_before_allocation(meta_len: int, payload_len: int) -> None:
    raw = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.Op.PUT, 0, 1, meta_len, payload_len, 0)
    decoder = p.FrameDecoder(MAX_PAYLOAD, replies=False)
    if meta_len > p.MAX_META_BYTES or payload_len > MAX_PAYLOAD or meta_len + payload_len == 0:
        with pytest.raises(errors.ProtocolError):
            decoder.feed(raw)
    else:
        assert decoder.feed(raw) == []  # waits for the rest; nothing allocated up front


def test_checksum_mismatch_is_detected() -> None:
    good = bytearray(frame(p.Op.GET, p.GetReply(found=True), b"0123456789", reply=True))
    good[-1] ^= 0xFF
    with pytest.raises(errors.ProtocolError, match="checksum"):
        p.FrameDecoder(MAX_PAYLOAD, replies=True).feed(bytes(good))


def test_request_where_reply_expected_is_refused() -> None:
    with pytest.raises(errors.ProtocolError):
        p.FrameDecoder(MAX_PAYLOAD, replies=True).feed(frame(p.Op.PING, p.Empty()))


def test_extension_metadata_registration() -> None:
    class ExtReq(msgspec.Struct, kw_only=True):
        slot: int

    with pytest.raises(ValueError):
        p.register_meta(0x20, p.Empty, p.Empty)
    p.register_meta(0x7F, ExtReq, p.Empty)  # type: ignore[arg-type]
    assert p.decode_meta(0x7F, False, msgspec.msgpack.encode({"slot": 3})) == ExtReq(slot=3)
