"""HTTP lookups of an index served by ``kvstrata index run`` (the memory backend lives in that process).

Endpoints (JSON):

- ``GET /health`` -> ``{"ok": true}``
- ``GET /instances`` -> ``[{"instance", "epoch", "lease_left_s"}, ...]``
- ``GET /stats`` -> the index's and the ingester's counters
- ``POST /lookup`` with ``{"tokens": [int, ...], "block_size"?: int, "extra_keys"?: [str|int, ...]}`` (keys
  computed in the server's namespace) or ``{"keys": ["<32 hex digits>", ...]}`` -> a
  :meth:`~kvstrata.index.base.LookupResult.to_json` object plus ``"block_size"``.

This module imports FastAPI at import time (FastAPI resolves the handlers' annotations from the module's
globals); only ``kvstrata index run`` imports it. Request bodies are bounded (:data:`MAX_BODY_BYTES`,
:data:`MAX_TOKENS`) before they are decoded.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Union

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvstrata.core.keys import Namespace, block_keys
from kvstrata.errors import InvalidArgumentError
from kvstrata.index.base import BlockIndex

if TYPE_CHECKING:
    from kvstrata.index.ingest import EventIngester

__all__ = ["MAX_BODY_BYTES", "MAX_TOKENS", "LookupRequest", "lookup_request", "make_app"]

#: Largest request body accepted.
MAX_BODY_BYTES = 16 * 1024**2
#: Most tokens (or keys) one lookup may carry.
MAX_TOKENS = 1_000_000


class LookupRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /lookup``: token ids, or ready-made block keys in hex."""

    tokens: Union[list[int], None] = None
    keys: Union[list[str], None] = None
    block_size: Union[int, None] = None
    extra_keys: list[Union[str, int]] = []


def lookup_request(body: bytes, namespace: Namespace, default_block_size: int) -> tuple[list[bytes], int]:
    """Decode and bound a lookup body; returns the block keys and the block size used."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidArgumentError(f"a lookup body is at most {MAX_BODY_BYTES} bytes")
    try:
        req = msgspec.json.decode(body, type=LookupRequest)
    except msgspec.DecodeError as exc:
        raise InvalidArgumentError(f"bad lookup request: {exc}") from exc
    block_size = req.block_size if req.block_size is not None else default_block_size
    if not 0 < block_size <= 1 << 16:
        raise InvalidArgumentError("block_size must be in [1, 65536]")
    if req.keys is not None:
        if len(req.keys) > MAX_TOKENS:
            raise InvalidArgumentError(f"at most {MAX_TOKENS} keys per lookup")
        try:
            keys = [bytes.fromhex(k) for k in req.keys]
        except ValueError as exc:
            raise InvalidArgumentError("keys are hex strings") from exc
        if any(len(k) != 16 for k in keys):
            raise InvalidArgumentError("a block key is 16 bytes (32 hex digits)")
        return keys, block_size
    if req.tokens is None:
        raise InvalidArgumentError("a lookup names 'tokens' or 'keys'")
    if len(req.tokens) > MAX_TOKENS:
        raise InvalidArgumentError(f"at most {MAX_TOKENS} tokens per lookup")
    return block_keys(namespace, req.tokens, block_size, extra_keys=req.extra_keys), block_size


def make_app(
    index: BlockIndex, namespace: Namespace, *, block_size: int = 16, ingester: EventIngester | None = None
) -> FastAPI:
    """The FastAPI application answering lookups from ``index``."""
    app = FastAPI(title="kvstrata index", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/instances")
    def instances() -> list[dict[str, Any]]:
        return [dataclasses.asdict(info) for info in index.instances()]

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        snapshot = getattr(index, "snapshot_stats", None)
        out: dict[str, Any] = {"index": dataclasses.asdict(snapshot() if snapshot else index.stats)}
        if ingester is not None:
            out["ingest"] = dataclasses.asdict(ingester.stats)
        return out

    @app.post("/lookup")
    async def lookup(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse(
                {"error": f"a lookup body is at most {MAX_BODY_BYTES} bytes"}, status_code=413
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            keys, used_block_size = lookup_request(bytes(body), namespace, block_size)
        except InvalidArgumentError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        result = index.lookup(keys)
        return JSONResponse({**result.to_json(), "block_size": used_block_size})

    return app
