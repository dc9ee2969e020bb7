"""The stand-ins of helpers.py against vLLM's own ``Request``, where vLLM is installed: the scheduler half
reads the same attributes, with the same meaning, from both (skipped without vLLM)."""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import pytest

from tests.connector_parts.helpers import Req, Rig, embedded_worker, make_spec, new_step, prefill, tokens

pytestmark = [
    pytest.mark.slow,  # importing vLLM takes seconds
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

PROMPT = tokens(100)


def _request(req_id: str, prompt: list[int], **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        # Importing vLLM warns about its own dependencies (torch.jit, ...): not this test's subject.
        warnings.simplefilter("ignore", DeprecationWarning)
        vllm = pytest.importorskip("vllm", reason="vLLM cannot be imported here")
        from vllm.v1.request import Request

    SamplingParams = vllm.SamplingParams

    return Request(req_id, prompt, SamplingParams(max_tokens=4), None, **kwargs)


def test_the_scheduler_half_reads_a_real_request_like_the_stand_in() -> None:
    spec = make_spec()
    rig = Rig(spec, [embedded_worker(spec)[0]])
    try:
        rig.report()
        real = _request("a", PROMPT)
        stand_in = Req("a", PROMPT)
        assert (real.num_tokens, list(real.all_token_ids)) == (stand_in.num_tokens, stand_in.all_token_ids)
        assert len(prefill(rig, real, list(range(7))).saves) == 3
        again = _request("b", PROMPT)
        assert rig.scheduler.get_num_new_matched_tokens(again, 0) == (96, False)
        assert rig.scheduler.get_num_new_matched_tokens(_request("c", PROMPT, cache_salt="x"), 0) == (
            0,
            False,
        )
        rig.scheduler.update_state_after_alloc(again, list(range(8, 15)), 96)
        (load,) = rig.step(new_step("b", list(range(8, 15)), 96, 4)).loads
        assert len(load.chunks) == 3
        # Decode grows all_token_ids on the real request too.
        real.append_output_token_ids(list(range(9000, 9028)))
        assert real.num_tokens == 128
    finally:
        rig.close()
