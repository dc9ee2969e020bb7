"""vLLM's KV-event format, both directions: decoding engine batches, encoding kvstrata's tier events.

Wire format (vLLM ``ZmqEventPublisher``): a PUB socket sends three frames per batch — topic, an 8-byte
big-endian sequence number (from 0), a msgpack payload. The payload is the batch ``[ts, events, dp_rank]``
(a map ``{"ts", "events", "data_parallel_rank"}`` is accepted too). Each event is either a map tagged with
``"type"`` (current vLLM) or a positional array whose first element is the tag (older vLLM); unknown fields
and trailing elements are ignored:

- ``BlockStored``: block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
  extra_keys, group_idx, ...
- ``BlockRemoved``: block_hashes, medium, group_idx
- ``AllBlocksCleared``: (kvstrata also reads an optional ``medium``)

``medium`` maps to a tier through one table (:data:`DEFAULT_MEDIUM_TIERS`; :data:`TIER_MEDIUMS` is its
inverse): GPU (or none) -> device, CPU -> host, DISK -> disk, REMOTE -> remote. :func:`encode_events`
writes kvstrata's tier events in the same format (see :mod:`kvstrata.index.publisher`); the ingester
(:mod:`kvstrata.index.ingest`) reads both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import msgspec

from kvstrata.core.keys import ExtraKey
from kvstrata.errors import InvalidArgumentError
from kvstrata.kvstore.tier import TierEvent

__all__ = [
    "DEFAULT_MEDIUM_TIERS",
    "END_SEQ",
    "MAX_PAYLOAD_BYTES",
    "TIER_MEDIUMS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineHash",
    "Event",
    "EventBatch",
    "decode_batch",
    "encode_events",
    "flatten_extra_keys",
]

#: vLLM's medium names -> kvstrata tiers (``None`` is the engine's GPU prefix cache).
DEFAULT_MEDIUM_TIERS: Mapping[str, str] = {"GPU": "device", "CPU": "host", "DISK": "disk", "REMOTE": "remote"}
#: kvstrata tier -> vLLM medium name: the same table, the other way.
TIER_MEDIUMS: Mapping[str, str] = {tier: medium for medium, tier in DEFAULT_MEDIUM_TIERS.items()}
#: Largest payload accepted (ZMQ drops bigger messages before allocating them).
MAX_PAYLOAD_BYTES = 64 * 1024**2
_MAX_BLOCK_SIZE = 1 << 16
#: The sequence number that ends a replay.
END_SEQ = -1

EngineHash = Union[int, bytes]


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks an engine stored (``token_ids`` covers them all, ``block_size`` each)."""

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks an engine dropped from ``medium``."""

    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """An engine dropped every block of ``medium`` (its GPU prefix cache when ``None``)."""

    medium: str | None = None


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True, slots=True)
class EventBatch:
    """A decoded payload: the events (unknown or malformed ones already dropped and counted)."""

    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None
    malformed: int = 0


def _hash(value: Any) -> EngineHash:
    if isinstance(value, bool) or not isinstance(value, (int, bytes)):
        raise ValueError("a block hash is an int or bytes")
    return value


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, (list, tuple)):
        raise ValueError("block_hashes is a list")
    # one C-level pass over the element types (ints, or bytes): the common case costs no Python call per hash
    kinds = set(map(type, value))
    if not kinds <= {int, bytes}:
        raise ValueError("a block hash is an int or bytes")
    return value if isinstance(value, list) else list(value)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _event(raw: Any) -> Event | None:
    """One event from its map or positional form; ``None`` for an unknown type; ValueError if malformed."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        get = raw.get
    elif isinstance(raw, (list, tuple)) and raw:
        kind = raw[0]
        names = {
            "BlockStored": (
                "block_hashes",
                "parent_block_hash",
                "token_ids",
                "block_size",
                "lora_id",
                "medium",
                "lora_name",
                "extra_keys",
                "group_idx",
            ),
            "BlockRemoved": ("block_hashes", "medium", "group_idx"),
            "AllBlocksCleared": ("medium",),
        }.get(kind if isinstance(kind, str) else "", ())
        fields = dict(zip(names, raw[1:], strict=False))
        get = fields.get
    else:
        raise ValueError("an event is a map or an array")
    if kind == "BlockStored":
        tokens = get("token_ids")
        block_size = get("block_size")
        # the ids themselves are checked (integers in [0, 2**32)) when they are hashed, in one numpy pass
        if not isinstance(tokens, (list, tuple)):
            raise ValueError("token_ids is a list of ints")
        if not isinstance(block_size, int) or not 0 < block_size <= _MAX_BLOCK_SIZE:
            raise ValueError("block_size is a positive int")
        parent = get("parent_block_hash")
        extra = get("extra_keys")
        return BlockStored(
            _hashes(get("block_hashes")),
            None if parent is None else _hash(parent),
            tokens if isinstance(tokens, list) else list(tokens),
            block_size,
            _opt_str(get("medium")),
            _opt_str(get("lora_name")),
            list(extra) if isinstance(extra, (list, tuple)) else None,
            _opt_int(get("group_idx")),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(_hashes(get("block_hashes")), _opt_str(get("medium")), _opt_int(get("group_idx")))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared(_opt_str(get("medium")))
    return None


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one msgpack payload; raises :class:`InvalidArgumentError` if it is not a batch at all."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError(f"KV-event payload is not msgpack: {exc}") from exc
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, (list, tuple)) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise InvalidArgumentError("KV-event payload is not a batch")
    if not isinstance(events, (list, tuple)):
        raise InvalidArgumentError("KV-event batch has no event list")
    out: list[Event] = []
    malformed = 0
    for item in events:
        try:
            event = _event(item)
        except ValueError:
            malformed += 1
            continue
        if event is not None:
            out.append(event)
    return EventBatch(float(ts) if isinstance(ts, (int, float)) else 0.0, out, _opt_int(rank), malformed)


def flatten_extra_keys(item: Any, out: list[ExtraKey]) -> None:
    """Append the extra keys in ``item`` (nested lists flattened; other objects as their str) to ``out``."""
    if item is None:
        return
    if isinstance(item, (list, tuple)):
        for sub in item:
            flatten_extra_keys(sub, out)
    elif isinstance(item, (str, bytes)) or (isinstance(item, int) and not isinstance(item, bool)):
        out.append(item)
    else:
        out.append(str(item))


def encode_events(
    events: list[TierEvent],
    *,
    block_size: int,
    encoding: Literal["map", "array"] = "map",
    int_hashes: bool = False,
    data_parallel_rank: int = 0,
    ts: float | None = None,
) -> bytes:
    """The msgpack payload of one batch of tier events, in vLLM's format (see the module docstring)."""
    out: list[Any] = []
    for event in events:
        medium = TIER_MEDIUMS.get(event.tier, event.tier.upper())
        if event.kind == "cleared":
            if encoding == "map":
                out.append({"type": "AllBlocksCleared", "medium": medium})
            else:
                out.append(["AllBlocksCleared", medium])
            continue
        if not event.block_keys:
            continue
        keys = event.block_keys
        hashes: list[Any] = [int.from_bytes(k[-8:], "big") for k in keys] if int_hashes else list(keys)
        if event.kind == "stored":
            if encoding == "map":
                out.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": hashes,
                        "parent_block_hash": None,
                        "token_ids": [],
                        "block_size": block_size,
                        "lora_id": None,
                        "medium": medium,
                        "lora_name": None,
                    }
                )
            else:
                out.append(["BlockStored", hashes, None, [], block_size, None, medium, None])
        elif encoding == "map":
            out.append({"type": "BlockRemoved", "block_hashes": hashes, "medium": medium})
        else:
            out.append(["BlockRemoved", hashes, medium])
    return msgspec.msgpack.encode([time.time() if ts is None else ts, out, data_parallel_rank])
