"""Engine KV-event ingestion: vLLM's ZMQ KV events (and kvstrata's own, same format) into a BlockIndex.

The format itself (both directions) is in :mod:`kvstrata.index.event_format`.

Wire format (vLLM ``ZmqEventPublisher``): a PUB socket sends three frames per batch — topic, an 8-byte
big-endian sequence number (from 0), a msgpack payload. The payload is the batch ``[ts, events, dp_rank]``
(a map ``{"ts", "events", "data_parallel_rank"}`` is accepted too). Each event is either a map tagged with
``"type"`` (current vLLM) or a positional array whose first element is the tag (older vLLM); unknown fields
and trailing elements are ignored:

- ``BlockStored``: block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
  extra_keys, group_idx, ...
- ``BlockRemoved``: block_hashes, medium, group_idx
- ``AllBlocksCleared``: (kvstrata also reads an optional ``medium``)

Re-keying: the engine's block hashes depend on its hash function and seed, so each ``BlockStored`` is
re-keyed from its token ids with kvstrata's key scheme (:func:`kvstrata.core.keys.block_keys`), chained
from the kvstrata key of ``parent_block_hash``; the engine-hash -> key map (bounded, LRU) is kept per engine
so that ``BlockRemoved`` can be applied. A block whose parent is unknown (its event was missed or
forgotten) cannot be keyed: it is skipped and counted. Extra keys: the event's per-block ``extra_keys``
(LoRA name, multimodal hashes, cache salt, flattened) are the blocks' extra keys; without them a
``lora_name`` is an extra key of every block. A ``BlockStored`` with no token ids whose hashes are all 16
bytes carries kvstrata keys already (what :mod:`kvstrata.index.publisher` sends) and is taken as is.

``medium`` maps to a tier: GPU (or none) -> device, CPU -> host, DISK -> disk, REMOTE -> remote.
``AllBlocksCleared`` removes what this ingester recorded for that medium's tier (GPU when none is given:
vLLM sends it when its prefix cache is reset). Only KV-cache group 0 is indexed (hybrid models send one
stream per group; the full-attention group is the prefix that matters for routing).

Sequence numbers: a gap triggers a replay request on the engine's ROUTER socket when one is configured (a
DEALER sends the start sequence; the replies are ``(seq, payload)`` until seq -1); what cannot be replayed
is counted and skipped (stale entries are hints: acting on one gives a miss downstream). A sequence that goes
backwards means the publisher restarted: the instance is cleared (epoch bump). The first batch seen from an
engine also clears it (whatever the index held may be stale) and replays what the engine still buffers.

vLLM connects its PUB socket when the endpoint names a host (``tcp://127.0.0.1:5557``) and binds when it
has ``*``; the ingester does the opposite (``bind=True`` to listen for a connecting engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kvstrata.core.keys import KEY_BYTES, ROOT_PARENT, ExtraKey, Namespace, block_keys
from kvstrata.errors import InvalidArgumentError, KVStrataError
from kvstrata.index.base import TIERS, BlockIndex
from kvstrata.index.event_format import (
    DEFAULT_MEDIUM_TIERS,
    END_SEQ,
    MAX_PAYLOAD_BYTES,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
    decode_batch,
    flatten_extra_keys,
)

__all__ = ["EngineEndpoint", "EventIngester", "IngestStats", "parse_endpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineEndpoint:
    """One engine's event stream: the instance it is indexed as, its PUB endpoint, its replay endpoint."""

    instance: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    bind: bool = False


def parse_endpoint(spec: str) -> EngineEndpoint:
    """Parse ``tcp://host:port[?instance=NAME&replay=tcp://host:port&topic=T&bind=1]``.

    The instance name defaults to ``host:port`` of the endpoint.
    """
    parts = urlsplit(spec)
    if parts.scheme not in ("tcp", "ipc", "inproc") or not (parts.netloc or parts.path):
        raise InvalidArgumentError(f"not a ZMQ endpoint: {spec!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return EngineEndpoint(
        instance=query.get("instance") or (parts.netloc or parts.path),
        endpoint=base,
        replay_endpoint=query.get("replay") or None,
        topic=query.get("topic", ""),
        bind=query.get("bind", "0").lower() in ("1", "true", "yes"),
    )


@dataclass(slots=True)
class IngestStats:
    """Counters of an ingester."""

    batches: int = 0
    events: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    clears: int = 0
    restarts: int = 0
    gaps: int = 0
    replayed: int = 0
    #: batches lost in gaps that could not be replayed
    lost: int = 0
    unkeyable: int = 0
    malformed: int = 0
    unknown_medium: int = 0
    other_groups: int = 0
    errors: int = 0


@dataclass(slots=True)
class _EngineState:
    spec: EngineEndpoint
    last_seq: int | None = None
    # engine hash -> [kvstrata key, tier bitmask]
    hashes: OrderedDict[EngineHash, list[Any]] = field(default_factory=OrderedDict)
    sub: Any = None
    replay: Any = None


class EventIngester:
    """Subscribe to engines' KV events and write them into ``index``, re-keyed in ``namespace``.

    Call order: construct, :meth:`start` (a background thread; or call :meth:`poll` yourself), then
    :meth:`close`. The instances' leases are renewed every ``lease_ttl_s / 3`` while the ingester runs:
    vLLM's event stream has no heartbeat, so a configured engine counts as live while it is ingested.
    Errors of one event or batch are logged and counted; the loop never dies of them.
    """

    def __init__(
        self,
        index: BlockIndex,
        namespace: Namespace,
        endpoints: Iterable[EngineEndpoint],
        *,
        medium_tiers: Mapping[str, str] = DEFAULT_MEDIUM_TIERS,
        replay_timeout_s: float = 1.0,
        max_engine_hashes: int = 1_000_000,
        heartbeat_s: float = 10.0,
    ) -> None:
        import zmq

        self._zmq = zmq
        self.index = index
        self.namespace = namespace
        self.stats = IngestStats()
        self._medium_tiers = {k.upper(): v for k, v in medium_tiers.items()}
        for tier in self._medium_tiers.values():
            if tier not in TIERS:
                raise InvalidArgumentError(f"unknown tier {tier!r} in the medium map")
        self._replay_timeout_ms = max(1, int(replay_timeout_s * 1000))
        self._max_hashes = max(1, max_engine_hashes)
        self._heartbeat_s = heartbeat_s
        self._ctx = zmq.Context()
        self._poller = zmq.Poller()
        self._engines: dict[Any, _EngineState] = {}
        self._by_instance: dict[str, list[_EngineState]] = {}
        self._direct: dict[str, _EngineState] = {}
        for spec in endpoints:
            sub = self._ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
            sub.setsockopt(zmq.RCVHWM, 100_000)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
            if spec.bind:
                sub.bind(spec.endpoint)
            else:
                sub.connect(spec.endpoint)
            state = _EngineState(spec, sub=sub)
            self._engines[sub] = state
            self._by_instance.setdefault(spec.instance, []).append(state)
            self._poller.register(sub, zmq.POLLIN)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_heartbeat = 0.0

    @property
    def instances(self) -> list[str]:
        """The instance names this ingester writes."""
        return list(self._by_instance)

    def bound_endpoints(self) -> list[str]:
        """The endpoints actually bound or connected, in the order given (resolves ``:0`` and ``*``)."""
        return [str(s.sub.getsockopt(self._zmq.LAST_ENDPOINT).decode()) for s in self._engines.values()]

    def start(self) -> None:
        """Run :meth:`poll` in a background thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._run, name="kvstrata-index-ingest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(100)
            except Exception:
                self.stats.errors += 1
                log.exception("event ingester: poll failed")
                time.sleep(0.1)

    def poll(self, timeout_ms: int = 0) -> int:
        """Receive and apply what is waiting, waiting up to ``timeout_ms``; returns the batches applied."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            for name in self._by_instance:
                self.index.heartbeat(name)
            self._next_heartbeat = now + self._heartbeat_s
        applied = 0
        ready = dict(self._poller.poll(timeout_ms))
        zmq = self._zmq
        for sock in ready:
            state = self._engines[sock]
            for _ in range(1000):  # bounded burst per socket, then give the others a turn
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                applied += self._on_frames(state, frames)
        return applied

    # -- sequence handling ------------------------------------------------------------------------
    def _on_frames(self, state: _EngineState, frames: Sequence[bytes]) -> int:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.malformed += 1
            return 0
        seq = int.from_bytes(frames[1], "big")
        last = state.last_seq
        if last is None or seq <= last:
            if last is not None:
                self.stats.restarts += 1
                log.info("event ingester: %s restarted (seq %d after %d)", state.spec.instance, seq, last)
            # first contact or a restarted publisher: what the index holds may be stale
            self._reset(state)
            if seq > 0:
                self._replay(state, 0, seq)
        elif seq > last + 1:
            self.stats.gaps += 1
            self._replay(state, last + 1, seq)
        state.last_seq = seq
        self._apply_payload(state, frames[2])
        return 1

    def _reset(self, state: _EngineState) -> None:
        instance = state.spec.instance
        if len(self._by_instance.get(instance, ())) > 1:
            # other streams feed this instance too (an engine's GPU events beside kvstrata's tier events):
            # forget only what this stream recorded
            for tier in TIERS:
                self._drop_tier(state, tier)
        else:
            self._safe(self.index.clear, instance)
        state.hashes.clear()
        state.last_seq = None
        self.stats.clears += 1

    def _replay(self, state: _EngineState, start: int, until: int) -> None:
        """Fetch batches [start, until) from the engine's replay socket and apply them in order."""
        if state.spec.replay_endpoint is None:
            if start > 0:
                self.stats.lost += until - start
                log.warning(
                    "event ingester: %s lost batches %d..%d (no replay endpoint)",
                    state.spec.instance,
                    start,
                    until - 1,
                )
            return
        zmq = self._zmq
        if state.replay is None:
            state.replay = self._ctx.socket(zmq.DEALER)
            state.replay.setsockopt(zmq.LINGER, 0)
            state.replay.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD_BYTES)
            state.replay.connect(state.spec.replay_endpoint)
        sock = state.replay
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        expected = start
        deadline = time.monotonic() + self._replay_timeout_ms / 1000
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms):
                # no complete answer: drop the socket so a late reply cannot be mistaken for the next one
                sock.close(linger=0)
                state.replay = None
                log.warning("event ingester: %s replay timed out", state.spec.instance)
                break
            frames = sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self.stats.malformed += 1
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            if seq == END_SEQ:
                break
            if seq < expected or seq >= until:
                continue
            if seq > expected:
                self.stats.lost += seq - expected
            state.last_seq = seq
            self._apply_payload(state, frames[2])
            self.stats.replayed += 1
            expected = seq + 1
        if expected < until:
            self.stats.lost += until - expected
            log.warning(
                "event ingester: %s could not replay batches %d..%d", state.spec.instance, expected, until - 1
            )

    # -- applying events --------------------------------------------------------------------------
    def _apply_payload(self, state: _EngineState, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except InvalidArgumentError as exc:
            self.stats.malformed += 1
            log.warning("event ingester: %s sent a bad payload: %s", state.spec.instance, exc)
            return
        self.stats.batches += 1
        self.stats.malformed += batch.malformed
        for event in batch.events:
            self.stats.events += 1
            try:
                self._apply(state, event)
            except KVStrataError as exc:
                self.stats.errors += 1
                log.warning("event ingester: %s: event not applied: %s", state.spec.instance, exc)

    def _tier(self, medium: str | None) -> str | None:
        tier = self._medium_tiers.get((medium or "GPU").upper())
        if tier is None:
            self.stats.unknown_medium += 1
        return tier

    def apply(self, instance: str, event: Event) -> None:
        """Apply one decoded event of ``instance`` to the index (the public hook for other transports)."""
        state = self._direct.get(instance)
        if state is None:
            state = self._direct[instance] = _EngineState(EngineEndpoint(instance, ""))
        self._apply(state, event)

    def _apply(self, state: _EngineState, event: Event) -> None:
        if isinstance(event, BlockStored):
            self._stored(state, event)
        elif isinstance(event, BlockRemoved):
            self._removed(state, event)
        else:
            self._cleared(state, event)

    def _stored(self, state: _EngineState, event: BlockStored) -> None:
        if event.group_idx not in (None, 0):
            self.stats.other_groups += 1
            return
        tier = self._tier(event.medium)
        if tier is None or not event.block_hashes:
            return
        hashes = event.block_hashes
        if not event.token_ids and all(isinstance(h, bytes) and len(h) == KEY_BYTES for h in hashes):
            keys: list[bytes] = [h for h in hashes if isinstance(h, bytes)]
        else:
            if event.parent_block_hash is None:
                parent = ROOT_PARENT
            else:
                entry = state.hashes.get(event.parent_block_hash)
                if entry is None:
                    self.stats.unkeyable += len(hashes)
                    return
                parent = entry[0]
            bs = event.block_size
            n = min(len(hashes), len(event.token_ids) // bs)
            if n < len(hashes):
                self.stats.unkeyable += len(hashes) - n
            if n == 0:
                return
            common: list[ExtraKey] = []
            per_block: list[list[ExtraKey]] | None = None
            if event.extra_keys is not None and len(event.extra_keys) >= n:
                per_block = []
                for item in event.extra_keys[:n]:
                    flat: list[ExtraKey] = []
                    flatten_extra_keys(item, flat)
                    per_block.append(flat)
            elif event.lora_name:
                common = [event.lora_name]
            keys = block_keys(
                self.namespace,
                event.token_ids[: n * bs],
                bs,
                extra_keys=common,
                block_extra_keys=per_block,
                parent=parent,
            )
            hashes = hashes[:n]
        bit = 1 << TIERS.index(tier)
        table = state.hashes
        for h, key in zip(hashes, keys, strict=False):
            entry = table.get(h)
            if entry is None:
                table[h] = [key, bit]
            else:
                entry[0] = key
                entry[1] |= bit
                table.move_to_end(h)
        while len(table) > self._max_hashes:
            table.popitem(last=False)
        self.index.add(state.spec.instance, tier, keys)
        self.stats.blocks_stored += len(keys)

    def _removed(self, state: _EngineState, event: BlockRemoved) -> None:
        if event.group_idx not in (None, 0):
            self.stats.other_groups += 1
            return
        tier = self._tier(event.medium)
        if tier is None:
            return
        bit = 1 << TIERS.index(tier)
        keys = []
        table = state.hashes
        for h in event.block_hashes:
            entry = table.get(h)
            if entry is None or not entry[1] & bit:
                continue
            keys.append(entry[0])
            entry[1] &= ~bit
            if not entry[1]:
                del table[h]
        if keys:
            self.index.remove(state.spec.instance, tier, keys)
            self.stats.blocks_removed += len(keys)

    def _cleared(self, state: _EngineState, event: AllBlocksCleared) -> None:
        tier = self._tier(event.medium)
        if tier is not None:
            self._drop_tier(state, tier)

    def _drop_tier(self, state: _EngineState, tier: str) -> None:
        bit = 1 << TIERS.index(tier)
        keys = []
        table = state.hashes
        for h, entry in list(table.items()):
            if entry[1] & bit:
                keys.append(entry[0])
                entry[1] &= ~bit
                if not entry[1]:
                    del table[h]
        if keys:
            self.index.remove(state.spec.instance, tier, keys)
            self.stats.blocks_removed += len(keys)

    def _safe(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except KVStrataError as exc:
            self.stats.errors += 1
            log.warning("event ingester: index write failed: %s", exc)

    def close(self) -> None:
        """Stop the thread and close the sockets (the index is left open: it belongs to the caller)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for state in self._engines.values():
            if state.sub is not None:
                state.sub.close(linger=0)
            if state.replay is not None:
                state.replay.close(linger=0)
        self._ctx.term()
