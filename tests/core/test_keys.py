"""The key scheme: the published test vectors, an independent implementation of the spec, properties."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.core.keys import (
    ROOT_PARENT,
    Namespace,
    block_keys,
    chunk_keys,
    encode_extra_keys,
)
from kvstrata.core.layout import KVLayout
from kvstrata.errors import InvalidArgumentError, LayoutError

DOC = Path(__file__).resolve().parents[2] / "docs" / "keys.md"


def _vectors() -> list[dict[str, Any]]:
    text = DOC.read_text()
    block = re.search(r"## 5\. Test vectors.*?```json\n(.*?)```", text, re.S)
    assert block is not None, "docs/keys.md lost its test-vector block"
    return list(json.loads(block.group(1)))


def _tokens(spec: Any) -> list[int]:
    return list(range(spec["range"])) if isinstance(spec, dict) else list(spec)


def _spec_keys(vector: dict[str, Any]) -> list[str]:
    """The scheme implemented again from docs/keys.md alone, with hashlib and struct."""
    lay = vector["layout"]
    canonical = (
        f"kvstrata-layout-v1|num_layers={lay['num_layers']}|num_kv_heads={lay['num_kv_heads']}"
        f"|head_size={lay['head_size']}|dtype={lay['dtype']}|block_size={lay['block_size']}"
        f"|chunk_tokens={lay['chunk_tokens']}|tp_rank=0|tp_size=1|engine_layout=kv_first_nhd"
    ).encode()
    fingerprint = hashlib.blake2b(canonical, digest_size=16).digest()
    model = vector["model_id"].encode()
    salt = vector["tenant_salt"].encode()
    secret = hashlib.blake2b(
        b"kvstrata-namespace-v1\x00"
        + struct.pack("<I", len(model))
        + model
        + fingerprint
        + struct.pack("<I", len(salt))
        + salt,
        digest_size=32,
    ).digest()

    def enc(items: list[Any]) -> bytes:
        out = b""
        for item in items:
            raw = item.encode()
            out += b"\x01" + struct.pack("<I", len(raw)) + raw
        return out

    tokens = _tokens(vector["tokens"])
    bs = lay["block_size"]
    parent = bytes(16)
    keys = []
    for i in range(len(tokens) // bs):
        data = parent + struct.pack(f"<{bs}I", *tokens[i * bs : (i + 1) * bs])
        data += enc(vector["extra_keys"])
        if "block_extra_keys" in vector:
            data += enc(vector["block_extra_keys"][i])
        parent = hashlib.blake2b(data, key=secret, digest_size=16).digest()
        keys.append(parent.hex())
    return keys


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_published_vectors(vector: dict[str, Any]) -> None:
    layout = KVLayout(**vector["layout"])
    ns = Namespace.for_layout(vector["model_id"], layout, vector["tenant_salt"])
    if "fingerprint" in vector:
        assert layout.fingerprint.hex() == vector["fingerprint"]
    if "secret" in vector:
        assert ns.secret.hex() == vector["secret"]
    keys = block_keys(
        ns,
        _tokens(vector["tokens"]),
        layout.block_size,
        extra_keys=vector["extra_keys"],
        block_extra_keys=vector.get("block_extra_keys"),
    )
    assert [k.hex() for k in keys] == vector["keys"]
    # The spec, implemented independently, agrees with the code and the vectors.
    assert _spec_keys(vector) == vector["keys"]


def test_extra_key_encoding_matches_doc() -> None:
    assert encode_extra_keys(["a", b"\x01", 7]).hex() == "01010000006102010000000103080000000700000000000000"


def test_token_inputs_agree_across_types() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_size=4, block_size=4, chunk_tokens=8)
    ns = Namespace.for_layout("m", layout)
    tokens = [5, 70000, 3, 2**32 - 1, 9, 8, 7, 6]
    expected = block_keys(ns, tokens, 4)
    assert block_keys(ns, np.array(tokens, dtype=np.int64), 4) == expected
    assert block_keys(ns, np.array(tokens, dtype=np.uint32), 4) == expected
    assert block_keys(ns, torch.tensor(tokens, dtype=torch.int64), 4) == expected


def test_bad_inputs_raise_typed_errors() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_size=4, block_size=4, chunk_tokens=8)
    ns = Namespace.for_layout("m", layout)
    with pytest.raises(InvalidArgumentError):
        block_keys(ns, [-1, 2, 3, 4], 4)
    with pytest.raises(InvalidArgumentError):
        block_keys(ns, [2**32, 2, 3, 4], 4)
    with pytest.raises(InvalidArgumentError):
        block_keys(ns, [[1, 2], [3, 4]], 4)
    with pytest.raises(InvalidArgumentError):
        block_keys(ns, [1.5, 2.0, 3.0, 4.0], 4)
    with pytest.raises(InvalidArgumentError):
        block_keys(ns, [1, 2, 3, 4], 4, parent=b"short")
    with pytest.raises(InvalidArgumentError):
        encode_extra_keys([1.5])  # type: ignore[list-item]
    with pytest.raises(LayoutError):
        KVLayout(num_layers=2, num_kv_heads=1, head_size=4, block_size=16, chunk_tokens=24)
    with pytest.raises(LayoutError):
        KVLayout(num_layers=2, num_kv_heads=1, head_size=4, dtype="float64")
    assert block_keys(ns, [], 4) == []
    assert block_keys(ns, [1, 2, 3], 4) == []


def test_chunk_keys_group_blocks() -> None:
    keys = [bytes([i]) * 16 for i in range(10)]
    chunks = chunk_keys(keys, 4)
    assert [c.digest for c in chunks] == [keys[3], keys[7]]
    assert chunks[1].block_keys == tuple(keys[4:8]) and chunks[1].first_block == 4
    partial = chunk_keys(keys, 4, include_partial=True)
    assert partial[-1].digest == keys[9] and partial[-1].num_blocks == 2


def test_layout_sizes_and_fingerprint_sensitivity() -> None:
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16")
    assert layout.chunk_bytes == 32 * 2 * 8 * 128 * 2 * 256 == 32 * 1024 * 1024
    other_rank = KVLayout(
        num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16", tp_rank=1, tp_size=2
    )
    other_dtype = KVLayout(num_layers=32, num_kv_heads=8, head_size=128, dtype="float16")
    assert len({layout.fingerprint, other_rank.fingerprint, other_dtype.fingerprint}) == 3


_LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_size=4, block_size=4, chunk_tokens=8)
token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=64)


@settings(max_examples=200, deadline=None)
@given(a=token_lists, b=token_lists)
def test_prefix_stability(a: list[int], b: list[int]) -> None:
    """Keys of a prompt's blocks are a prefix of the keys of any extension of that prompt."""
    ns = Namespace.for_layout("m", _LAYOUT)
    ka, kab = block_keys(ns, a, 4), block_keys(ns, a + b, 4)
    assert kab[: len(ka)] == ka
    # Continuing a chain from the last full block gives the same keys as hashing all at once.
    full = len(a) - len(a) % 4
    parent = ka[-1] if ka else ROOT_PARENT
    assert ka + block_keys(ns, a[full:] + b, 4, parent=parent) == kab


@settings(max_examples=200, deadline=None)
@given(a=token_lists, b=token_lists)
def test_keys_name_the_whole_prefix(a: list[int], b: list[int]) -> None:
    """Block i's keys are equal exactly when the first i+1 blocks are equal."""
    ns = Namespace.for_layout("m", _LAYOUT)
    ka, kb = block_keys(ns, a, 4), block_keys(ns, b, 4)
    for i in range(min(len(ka), len(kb))):
        assert (ka[i] == kb[i]) == (a[: 4 * (i + 1)] == b[: 4 * (i + 1)])


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=4, max_size=32),
    model_a=st.text(max_size=8),
    model_b=st.text(max_size=8),
    salt_a=st.binary(max_size=4),
    salt_b=st.binary(max_size=4),
)
def test_namespace_separation(
    tokens: list[int], model_a: str, model_b: str, salt_a: bytes, salt_b: bytes
) -> None:
    """Different namespaces never share a key for the same tokens."""
    ns_a = Namespace.for_layout(model_a, _LAYOUT, salt_a)
    ns_b = Namespace.for_layout(model_b, _LAYOUT, salt_b)
    same = (model_a, salt_a) == (model_b, salt_b)
    ka, kb = block_keys(ns_a, tokens, 4), block_keys(ns_b, tokens, 4)
    assert (ka == kb) == same
    if not same:
        assert not set(ka) & set(kb)
