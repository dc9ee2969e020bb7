"""Decoding and bounding of HTTP lookup requests (the server itself is exercised in test_commands)."""

from __future__ import annotations

import json

import pytest

from kvstrata.core.keys import Namespace, block_keys
from kvstrata.errors import InvalidArgumentError
from kvstrata.index.http import MAX_BODY_BYTES, lookup_request

NS = Namespace("m", bytes(16))


def test_tokens_are_keyed_in_the_server_namespace() -> None:
    body = json.dumps({"tokens": list(range(40)), "block_size": 8, "extra_keys": ["lora-a"]}).encode()
    keys, block_size = lookup_request(body, NS, 16)
    assert block_size == 8
    assert keys == block_keys(NS, list(range(40)), 8, extra_keys=["lora-a"])
    keys, block_size = lookup_request(b'{"tokens": [1, 2, 3]}', NS, 16)
    assert (keys, block_size) == ([], 16)


def test_keys_in_hex() -> None:
    key = bytes(range(16))
    assert lookup_request(json.dumps({"keys": [key.hex()]}).encode(), NS, 16) == ([key], 16)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"tokens": "nope"}',
        b'{"tokens": [-1]}',
        b'{"keys": ["zz"]}',
        b'{"keys": ["00"]}',
        b"{}",
        b'{"tokens": [1], "block_size": 0}',
        b'{"tokens": [1], "unknown": 1}',
        b" " * (MAX_BODY_BYTES + 1),
    ],
)
def test_bad_requests_are_typed_errors(body: bytes) -> None:
    with pytest.raises(InvalidArgumentError):
        lookup_request(body, NS, 16)
