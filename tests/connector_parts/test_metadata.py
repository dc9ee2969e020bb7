"""The per-step messages between the halves: msgpack round trips, and clear refusals of anything else."""

from __future__ import annotations

import msgspec
import pytest

from kvstrata.connector.metadata import (
    MAX_MESSAGE_BYTES,
    ChunkLoad,
    ChunkSave,
    LoadSpec,
    StepPlan,
    TierChange,
    WorkerReport,
    decode_plan,
    decode_report,
    encode,
)
from kvstrata.errors import InvalidArgumentError
from kvstrata.kernels.paged import SKIP_BLOCK

K = [bytes([i]) * 16 for i in range(8)]


def _plan() -> StepPlan:
    return StepPlan(
        loads=(
            LoadSpec("req-1", (ChunkLoad((K[0], K[1]), (SKIP_BLOCK, 7)), ChunkLoad((K[2], K[3]), (8, 9)))),
            LoadSpec("req-2", (ChunkLoad((K[4], K[5]), (1, 2)),), asynchronous=True),
        ),
        saves=(ChunkSave("req-3", (K[6], K[7]), ((K[0], K[6]), (K[1], K[7])), (3, 4), 32),),
        finished=("req-0",),
    )


def _reports() -> list[WorkerReport]:
    return [
        WorkerReport(rank=0, snapshot=True, changes=(TierChange("stored", "disk", (K[0], K[2])),)),
        WorkerReport(
            rank=1,
            changes=(
                TierChange("stored", "host", (K[1],), (K[5], K[1])),
                TierChange("removed", "host", (K[3],), (K[4], K[3])),
                TierChange("cleared", "disk"),
            ),
            counters={"loaded_chunks": 3, "load_seconds": 0.25},
        ),
    ]


def test_plan_round_trip() -> None:
    plan = _plan()
    payload = encode(plan)
    assert isinstance(payload, bytes)
    assert decode_plan(payload) == plan
    assert decode_plan(payload).loads[0].chunks[0].block_ids[0] == SKIP_BLOCK
    assert decode_plan(encode(StepPlan())) == StepPlan()


def test_reports_round_trip() -> None:
    reports = _reports()
    assert decode_report(encode(reports)) == reports
    assert decode_report(encode([])) == []


def test_messages_are_plain_msgpack() -> None:
    """Any msgpack reader can read them: no pickle, no extension types."""
    generic = msgspec.msgpack.decode(encode(_plan()))
    assert generic["finished"] == ["req-0"]
    assert generic["loads"][0][0] == "req-1"  # array-like structs: positional
    assert msgspec.msgpack.decode(encode(_reports()))[1]["rank"] == 1


def test_oversized_messages_are_refused_before_decoding() -> None:
    huge = b"\x80" + bytes(MAX_MESSAGE_BYTES)  # an empty map followed by zeros: only the size is wrong
    with pytest.raises(InvalidArgumentError, match=f"over {MAX_MESSAGE_BYTES}"):
        decode_plan(huge)
    with pytest.raises(InvalidArgumentError, match=f"over {MAX_MESSAGE_BYTES}"):
        decode_report(huge)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"not msgpack at all",
        encode(_plan())[:-3],  # truncated
        encode(_reports()),  # a list of reports is not a plan
        msgspec.msgpack.encode({"loads": [["req", [[["k"], ["x"]]], False]]}),  # block ids of the wrong type
        msgspec.msgpack.encode({"loads": [], "surprise": 1, "saves": "nope"}),
    ],
    ids=["empty", "reserved-byte", "text", "truncated", "reports", "wrong-types", "wrong-field"],
)
def test_malformed_plans_are_refused_clearly(payload: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match="malformed connector step plan"):
        decode_plan(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        encode(_plan()),  # a plan is not a list of reports
        msgspec.msgpack.encode([{"rank": "zero"}]),
        msgspec.msgpack.encode([{"rank": 0, "changes": [["exploded", "host", [], []]]}]),  # unknown kind
        msgspec.msgpack.encode([{"snapshot": True}]),  # no rank
    ],
    ids=["empty", "plan", "rank-type", "change-kind", "no-rank"],
)
def test_malformed_reports_are_refused_clearly(payload: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match="malformed connector worker report"):
        decode_report(payload)
