"""What the scheduler half and the worker halves tell each other, once per engine step (msgspec, no pickle).

vLLM carries a connector's per-step metadata from the scheduler to every worker and the workers' reports
back, with whatever IPC its executor uses. kvstrata puts only bytes on that path: :class:`StepPlan` and
:class:`WorkerReport` are msgspec structs encoded to msgpack by the side that makes them and decoded by the
side that reads them, so no process ever unpickles a kvstrata object.

- :class:`StepPlan` (scheduler -> workers): the chunks to load into newly allocated blocks, the chunks to
  save after this step's forward pass, and the requests that finished. Keys travel per TP rank
  (``keys[rank]``): each rank stores its own shard under its own namespace.
- :class:`WorkerReport` (a worker -> the scheduler): what changed in that rank's cache (chunks stored and
  removed, per tier), with a full catalog on the first report after start-up so that the scheduler knows what
  a restarted engine's disk tier still holds, and the counters of the step.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from kvstrata.errors import InvalidArgumentError

__all__ = [
    "ChunkLoad",
    "ChunkSave",
    "LoadSpec",
    "StepPlan",
    "TierChange",
    "WorkerReport",
    "decode_plan",
    "decode_report",
    "encode",
]

#: Bound of an encoded plan or report: far above any real step (a 1M-token prompt is ~4k chunks).
MAX_MESSAGE_BYTES = 64 * 1024**2


class ChunkLoad(msgspec.Struct, frozen=True, array_like=True):
    """One chunk to load: its key on each rank and the engine block of each of its blocks (``-1``: the
    engine already holds that block, leave it alone)."""

    keys: tuple[bytes, ...]
    block_ids: tuple[int, ...]


class LoadSpec(msgspec.Struct, frozen=True, array_like=True):
    """The chunks one request loads, in prompt order. ``asynchronous``: loaded off the forward pass and
    reported through ``get_finished`` (remote servers); else before this step's forward pass (embedded)."""

    req_id: str
    chunks: tuple[ChunkLoad, ...]
    asynchronous: bool = False


class ChunkSave(msgspec.Struct, frozen=True, array_like=True):
    """One full chunk to save after this step: its key and block keys on each rank, its blocks."""

    req_id: str
    keys: tuple[bytes, ...]
    block_keys: tuple[tuple[bytes, ...], ...]
    block_ids: tuple[int, ...]
    num_tokens: int


class StepPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Scheduler -> workers, once per step."""

    loads: tuple[LoadSpec, ...] = ()
    saves: tuple[ChunkSave, ...] = ()
    finished: tuple[str, ...] = ()


class TierChange(msgspec.Struct, frozen=True, array_like=True):
    """Chunks stored in / removed from one tier of one rank's cache (``cleared``: the whole tier)."""

    kind: Literal["stored", "removed", "cleared"]
    tier: str
    keys: tuple[bytes, ...] = ()
    block_keys: tuple[bytes, ...] = ()


class WorkerReport(msgspec.Struct, frozen=True, kw_only=True):
    """A worker -> the scheduler, once per step. ``snapshot``: ``changes`` list everything the rank holds
    (sent once, first), so the scheduler replaces what it knew of that rank."""

    rank: int
    snapshot: bool = False
    changes: tuple[TierChange, ...] = ()
    counters: dict[str, float] = msgspec.field(default_factory=dict)


_ENCODER = msgspec.msgpack.Encoder()
_PLAN = msgspec.msgpack.Decoder(StepPlan)
_REPORTS = msgspec.msgpack.Decoder(list[WorkerReport])


def encode(value: StepPlan | list[WorkerReport]) -> bytes:
    """msgpack bytes of a plan or of a list of reports."""
    return _ENCODER.encode(value)


def _checked(data: bytes) -> bytes:
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidArgumentError(f"a connector message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}")
    return data


def decode_plan(data: bytes) -> StepPlan:
    """The inverse of :func:`encode` for a plan; a malformed message raises ``InvalidArgumentError``."""
    try:
        return _PLAN.decode(_checked(data))
    except msgspec.DecodeError as exc:
        raise InvalidArgumentError(f"malformed connector step plan: {exc}") from exc


def decode_report(data: bytes) -> list[WorkerReport]:
    """The inverse of :func:`encode` for reports; a malformed message raises ``InvalidArgumentError``."""
    try:
        return _REPORTS.decode(_checked(data))
    except msgspec.DecodeError as exc:
        raise InvalidArgumentError(f"malformed connector worker report: {exc}") from exc
