"""A kvs+nixl client run as its own process by tests/transport/test_nixl.py.

NIXL's native teardown at interpreter exit has been seen to crash, so the tests keep the NIXL agent out of
the pytest process: this script does the client's part, prints its findings as JSON lines and leaves with
``os._exit``. Usage: ``python -m tests.transport.nixl_client URL TOKEN roundtrip|stream|all``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

from kvstrata.client import Client
from kvstrata.errors import ConnectError, RequestTimeoutError


def chunk(seed: int, size: int) -> torch.Tensor:
    """Deterministic bytes, so that another process can check them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)


def key(seed: int) -> bytes:
    """A deterministic 16-byte key."""
    return seed.to_bytes(8, "little") * 2


def roundtrip(url: str, token: str) -> dict[str, object]:
    sizes = [1, 4096, 300_000, 4 * 1024**2]
    keys = [key(100 + i) for i in range(len(sizes))]
    datas = [chunk(100 + i, s) for i, s in enumerate(sizes)]
    with Client(url, token=token) as client:
        client.put_many(keys, datas)
        outs = [torch.empty(s + 3, dtype=torch.uint8) for s in sizes]
        got = client.get_many(keys, outs)
        for g, d, o in zip(got, datas, outs, strict=True):
            assert g is not None and torch.equal(g, d), "wrong bytes"
            assert g.data_ptr() == o.data_ptr(), "not filled in place"
        fresh = client.get(keys[2])
        assert fresh is not None and torch.equal(fresh, datas[2])
        assert client.get(os.urandom(16)) is None
        assert client.exists([keys[0], os.urandom(16)]) == [True, False]
        assert client.lookup_prefix([*keys, os.urandom(16)]).num_chunks == len(keys)
        assert client.delete([keys[0]]) == 1
        assert client.get(keys[0]) is None
        transport = type(client._servers[0]._idle[0]).__name__
        # a chunk the parent put over tcp comes back through NIXL
        other = client.get(key(7))
        other_ok = other is not None and torch.equal(other, chunk(7, 200_000))
    return {"ok": True, "transport": transport, "other_ok": other_ok}


def stream(url: str, token: str) -> dict[str, object]:
    keys = [key(200 + i) for i in range(8)]
    datas = [chunk(200 + i, 512 * 1024) for i in range(8)]
    outcomes = {"hits": 0, "misses": 0, "errors": 0, "wrong": 0}
    client = Client(url, token=token, timeout=2.0, retry_backoff=0.05)
    client.put_many(keys, datas)
    print("READY", flush=True)
    deadline = time.monotonic() + 40
    hits_after_error = 0
    while time.monotonic() < deadline and hits_after_error < 16:
        try:
            client.put_many(keys[:4], datas[:4])
            got = client.get_many(keys, [torch.empty(512 * 1024, dtype=torch.uint8) for _ in keys])
        except (ConnectError, RequestTimeoutError):
            outcomes["errors"] += 1
            time.sleep(0.02)
            continue
        for i, g in enumerate(got):
            if g is None:
                outcomes["misses"] += 1
            elif torch.equal(g, datas[i]):
                outcomes["hits"] += 1
                if outcomes["errors"] or outcomes["misses"]:
                    hits_after_error += 1
            else:
                outcomes["wrong"] += 1
        time.sleep(0.005)
    client.close()
    return {**outcomes, "recovered": hits_after_error >= 16}


def main() -> None:
    url, token, mode = sys.argv[1:4]
    try:
        if mode in ("roundtrip", "all"):
            print(json.dumps({"phase": "roundtrip", **roundtrip(url, token)}), flush=True)
        if mode in ("stream", "all"):
            print(json.dumps({"phase": "stream", **stream(url, token)}), flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    os._exit(code)


if __name__ == "__main__":
    main()
