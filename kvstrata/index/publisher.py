"""Publish kvstrata's own tier events as vLLM-compatible KV events.

:class:`TierEventPublisher` is a :data:`~kvstrata.kvstore.tier.TierListener`: subscribe it to a tier or a
store (``tier.subscribe(publisher)``, or :meth:`TierEventPublisher.attach`) and every stored / removed /
cleared event goes out on a ZMQ PUB socket exactly as vLLM's ``ZmqEventPublisher`` frames it — topic, 8-byte
big-endian sequence from 0, msgpack ``[ts, events, dp_rank]`` — with a ROUTER replay socket that serves
buffered batches from a start sequence and ends with sequence -1. So kvstrata's offloaded tiers are visible
to any router that reads vLLM's KV events, including :class:`kvstrata.index.ingest.EventIngester`.

How kvstrata's blocks appear in vLLM's format:

- ``medium``: the tier — device -> ``"GPU"``, host -> ``"CPU"``, disk -> ``"DISK"``, remote -> ``"REMOTE"``.
- ``block_hashes``: the 16-byte kvstrata block keys themselves, as msgpack bin (vLLM's bytes mode, as with
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``). With ``int_hashes=True`` they are sent as vLLM's int mode
  does — the low 64 bits, i.e. the last 8 bytes read big-endian — for consumers that only take ints; those
  cannot be turned back into kvstrata keys, so kvstrata's own ingester needs the default bytes mode.
- ``token_ids`` is empty and ``parent_block_hash`` is nil: kvstrata keys already chain the prefix and carry
  the namespace, so there is nothing to re-key. An empty ``token_ids`` with 16-byte hashes is how the
  ingester recognises kvstrata keys.
- ``block_size`` is the engine block size given to the publisher; ``lora_id`` and ``lora_name`` are nil.
- A tier ``clear`` is ``AllBlocksCleared`` with an extra ``medium`` field (vLLM's decoders ignore unknown
  fields; kvstrata's ingester clears only that tier).

Listeners run on the thread that changed the tier, so :meth:`__call__` only enqueues (bounded; a full queue
drops and counts, it never blocks a tier); a background thread owns the sockets.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, Protocol

from kvstrata.index.event_format import encode_events
from kvstrata.kvstore.tier import TierEvent

__all__ = ["TierEventPublisher"]

log = logging.getLogger(__name__)

_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class _Subscribable(Protocol):
    def subscribe(self, listener: Callable[[TierEvent], None]) -> Callable[[], None]: ...


class TierEventPublisher:
    """A vLLM-compatible KV-event publisher fed by kvstrata tier events (a ``TierListener``).

    ``endpoint`` is bound when it contains ``*`` or is ipc/inproc and connected otherwise (vLLM's rule);
    ``bind`` overrides that. ``replay_endpoint``, when given, is bound as the ROUTER replay socket.
    Call order: construct, subscribe it to tiers (:meth:`attach`), :meth:`close` at the end.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        block_size: int = 16,
        encoding: Literal["map", "array"] = "map",
        int_hashes: bool = False,
        bind: bool | None = None,
        buffer_steps: int = 10_000,
        max_queue: int = 10_000,
        data_parallel_rank: int = 0,
    ) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        if bind is None:
            bind = "*" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
        if bind:
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self._replay = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
        self._topic = topic.encode()
        self._block_size = block_size
        self._encoding: Literal["map", "array"] = encoding
        self._int_hashes = int_hashes
        self._rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=max(1, buffer_steps))
        self._queue: queue.Queue[TierEvent | None] = queue.Queue(maxsize=max(1, max_queue))
        self._seq = 0
        self.dropped = 0
        self.published = 0
        self._unsubscribers: list[Callable[[], None]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvstrata-kv-events", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The PUB socket's actual endpoint (resolves ``*`` and port 0)."""
        return bytes(self._pub.getsockopt(self._zmq.LAST_ENDPOINT)).decode()

    @property
    def replay_endpoint(self) -> str | None:
        """The ROUTER socket's actual endpoint, if any."""
        if self._replay is None:
            return None
        return bytes(self._replay.getsockopt(self._zmq.LAST_ENDPOINT)).decode()

    def __call__(self, event: TierEvent) -> None:
        """Enqueue ``event`` for publishing (never blocks; a full queue drops and counts)."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def attach(self, source: _Subscribable) -> Callable[[], None]:
        """Subscribe to a tier or store's events; returns the unsubscribe function."""
        unsubscribe = source.subscribe(self)
        self._unsubscribers.append(unsubscribe)
        return unsubscribe

    def _run(self) -> None:
        while True:
            if self._replay is not None:
                try:
                    while self._replay.poll(0):
                        self._serve_replay()
                except Exception:
                    log.exception("kv-event publisher: replay failed")
            try:
                first = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            if first is None:
                return
            events = [first]
            stop = False
            while len(events) < 256:  # one batch per wake-up, like an engine step
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                events.append(more)
            try:
                payload = encode_events(
                    events,
                    block_size=self._block_size,
                    encoding=self._encoding,
                    int_hashes=self._int_hashes,
                    data_parallel_rank=self._rank,
                )
                seq = self._seq
                self._seq += 1
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
                self.published += len(events)
            except Exception:
                log.exception("kv-event publisher: publish failed")
            if stop:
                return

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv-event publisher: bad replay request")
            return
        client, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", _END_SEQ, b""))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every enqueued event has been published."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._queue.empty()

    def close(self) -> None:
        """Unsubscribe, publish what is queued, stop the thread, close the sockets; idempotent."""
        if self._closed:
            return
        for unsubscribe in self._unsubscribers:
            unsubscribe()
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
