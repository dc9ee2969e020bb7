"""EngineSpec and KeyChain: the keys the connector computes are kvstrata's block keys, made once per block
as a request grows, and under a namespace that isolates everything that changes the KV bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstrata.connector.scheduler import request_extra_keys
from kvstrata.connector.spec import EngineSpec, KeyChain, default_chunk_tokens
from kvstrata.core.keys import Namespace, block_keys
from kvstrata.errors import InvalidArgumentError, LayoutError
from tests.connector_parts.helpers import BLOCK, LoRA, Req, make_spec, tokens

ROOT = Path(__file__).resolve().parents[2]


def _keys_at_once(spec: EngineSpec, toks: list[int], extras: tuple[str, ...] = ()) -> list[list[bytes]]:
    return [block_keys(ns, toks, spec.block_size, extra_keys=extras) for ns in spec.namespaces]


@pytest.mark.parametrize("extras", [(), ("lora:a", "salt:s")])
def test_incremental_keys_equal_keys_computed_at_once(extras: tuple[str, ...]) -> None:
    spec = make_spec(tp_size=2)
    toks = tokens(10 * BLOCK + 5)  # ten full blocks and a partial one
    chain = KeyChain(spec, extras)
    # As a request grows: a prefill chunk, more prompt, decode one token at a time, a long jump.
    assert chain.extend(toks[: BLOCK + 3], 8) == 1  # only full blocks of what is there get keys
    assert chain.extend(toks[: 4 * BLOCK], 3) == 3
    assert chain.extend(toks[: 4 * BLOCK], 2) == 3  # never shrinks, never re-keys
    for n in range(4 * BLOCK, 6 * BLOCK + 1):
        chain.extend(toks[:n], 100)
    assert chain.num_blocks == 6
    assert chain.extend(toks, 100) == 10
    assert chain.keys == _keys_at_once(spec, toks[: 10 * BLOCK], extras)
    assert chain.keys[0] != chain.keys[1]  # each TP rank keys its own shard


def test_chunk_keys_are_the_keys_of_their_last_blocks() -> None:
    spec = make_spec(tp_size=2)
    chain = KeyChain(spec)
    chain.extend(tokens(6 * BLOCK), 6)
    bpc = spec.blocks_per_chunk
    for chunk in range(3):
        assert chain.chunk_keys(chunk) == tuple(keys[(chunk + 1) * bpc - 1] for keys in chain.keys)
        assert chain.chunk_block_keys(chunk) == tuple(
            tuple(keys[chunk * bpc : (chunk + 1) * bpc]) for keys in chain.keys
        )


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "other-model"},
        {"dtype": "bfloat16"},
        {"engine_layout": "kv_first_nhd"},
        {"block_size": 32, "chunk_tokens": 64},
        {"chunk_tokens": 64},
        {"num_kv_heads": 4},
        {"head_size": 32},
        {"num_layers": 3},
        {"tp_size": 2},
        {"tenant_salt": "tenant-b"},
    ],
    ids=lambda c: ",".join(c),
)
def test_namespace_changes_with_everything_that_changes_the_kv(change: dict[str, object]) -> None:
    base, other = make_spec(), make_spec(**change)  # type: ignore[arg-type]
    toks = tokens(4 * 32)
    assert base.namespaces[0] != other.namespaces[0]
    assert base.namespaces[0].id != other.namespaces[0].id
    ours = KeyChain(base)
    theirs = KeyChain(other)
    ours.extend(toks, 100)
    theirs.extend(toks, 100)
    assert not set(ours.keys[0]) & set(theirs.keys[0])


def test_tp_ranks_have_their_own_namespaces_and_equal_specs_equal_keys() -> None:
    spec = make_spec(tp_size=4)
    assert len({ns.id for ns in spec.namespaces}) == 4
    assert [layout.tp_rank for layout in spec.layouts] == [0, 1, 2, 3]
    again = make_spec(tp_size=4)
    assert again.namespaces == spec.namespaces
    a, b = KeyChain(spec), KeyChain(again)
    a.extend(tokens(64), 4)
    b.extend(tokens(64), 4)
    assert a.keys == b.keys


def test_extra_keys_isolate_and_equal_extras_share() -> None:
    spec = make_spec()
    toks = tokens(64)
    plain, lora, lora_again, salted = (
        KeyChain(spec),
        KeyChain(spec, ("lora:a",)),
        KeyChain(spec, ("lora:a",)),
        KeyChain(spec, ("salt:x",)),
    )
    for chain in (plain, lora, lora_again, salted):
        chain.extend(toks, 4)
    assert lora.keys == lora_again.keys
    assert len({plain.keys[0][0], lora.keys[0][0], salted.keys[0][0]}) == 3


def test_request_extra_keys() -> None:
    assert request_extra_keys(Req("a", tokens(4))) == ()
    assert request_extra_keys(Req("a", tokens(4), lora_request=LoRA("sql"), cache_salt="s1")) == (
        "lora:sql",
        "salt:s1",
    )
    # The token ids do not determine the KV: kvstrata stays out.
    assert request_extra_keys(Req("a", tokens(4), mm_features=[object()])) is None
    assert request_extra_keys(Req("a", tokens(4), prompt_embeds=object())) is None


_CHILD = """
import json, sys
from kvstrata.connector.spec import EngineSpec, KeyChain
spec = EngineSpec(model_id="m", num_layers=2, num_kv_heads=2, head_size=16, dtype="float16",
                  block_size=16, chunk_tokens=32, tp_size=2, engine_layout="cpu_packed")
chain = KeyChain(spec, ("lora:a",))
chain.extend(list(range(1000, 1064)), 4)
print(json.dumps([[k.hex() for k in keys] for keys in chain.keys]))
"""


def test_keys_do_not_depend_on_pythonhashseed() -> None:
    """Two processes with other hash seeds (vLLM's own block hashes would differ) compute the same keys."""
    outs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        outs.append(json.loads(run.stdout))
    spec = make_spec(model_id="m", tp_size=2)
    chain = KeyChain(spec, ("lora:a",))
    chain.extend(tokens(64), 4)
    assert outs[0] == outs[1] == [[k.hex() for k in keys] for keys in chain.keys]


def test_chunk_size_rules() -> None:
    assert default_chunk_tokens(16) == 256
    assert default_chunk_tokens(128) == 256
    assert default_chunk_tokens(96) == 288  # 256 rounded up to a multiple of the block
    assert default_chunk_tokens(16, 64) == 64
    with pytest.raises(InvalidArgumentError, match="multiple of the block size"):
        default_chunk_tokens(16, 40)
    with pytest.raises(InvalidArgumentError, match="positive"):
        default_chunk_tokens(0)
    with pytest.raises(LayoutError, match="multiple of block_size"):
        make_spec(chunk_tokens=40)
    spec = make_spec()
    assert spec.blocks_per_chunk == 2
    assert "namespace=" + spec.namespaces[0].id.hex() in spec.describe()
    assert isinstance(spec.namespaces[0], Namespace)
