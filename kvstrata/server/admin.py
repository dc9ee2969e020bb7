"""The admin HTTP API of the cache server (FastAPI): health, readiness, Prometheus metrics, stats, lookup.

- ``GET /healthz``   — 200 while the process runs.
- ``GET /readyz``    — 200 once the data port listens (503 while starting or shutting down).
- ``GET /metrics``   — Prometheus text format: tier counters and server counters.
- ``GET /v1/stats``  — per tier: chunks, bytes, capacity, hits, misses, puts, evictions, errors; plus
  server counters.
- ``GET /v1/lookup?keys=HEX,HEX,...`` or ``POST /v1/lookup`` with ``{"keys": [hex, ...]}`` — how many
  leading chunks are held, the highest tier of each, and the leading depth per tier.
- ``GET /v1/index/lookup?keys=HEX,...`` — the global block index this server publishes to (``--index``):
  for block keys, each instance's longest prefix and depth per tier (404 when no index is configured).

With a token configured, everything but ``/healthz`` and ``/readyz`` requires ``Authorization: Bearer
<token>`` (compared in constant time).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstrata import __version__
from kvstrata.core.keys import KEY_BYTES
from kvstrata.server.app import CacheServer
from kvstrata.server.handlers import stats_payload

__all__ = ["MAX_LOOKUP_KEYS", "create_admin_app"]

#: Most keys one lookup may name (bounds the work of one HTTP request).
MAX_LOOKUP_KEYS = 4096


def _parse_keys(raw: list[str]) -> list[bytes]:
    if len(raw) > MAX_LOOKUP_KEYS:
        raise HTTPException(413, f"at most {MAX_LOOKUP_KEYS} keys per lookup")
    keys = []
    for text in raw:
        try:
            key = bytes.fromhex(text)
        except ValueError as exc:
            raise HTTPException(400, f"not a hex key: {text[:40]!r}") from exc
        if len(key) != KEY_BYTES:
            raise HTTPException(400, f"a key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits)")
        keys.append(key)
    return keys


def create_admin_app(server: CacheServer, token: bytes | None = None) -> FastAPI:
    """The admin application for ``server``."""
    app = FastAPI(title="kvstrata admin", version=__version__, docs_url=None, redoc_url=None)
    expected = b"Bearer " + token if token else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, Any]:
        if not server.ready:
            response.status_code = 503
            return {"ready": False}
        return {"ready": True, "port": server.port}

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        check(request)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats")
    def v1_stats(request: Request) -> dict[str, Any]:
        check(request)
        tiers, counters = stats_payload(server)
        return {"tiers": tiers, "server": counters, "transports": server.transports}

    def lookup(keys: list[bytes]) -> dict[str, Any]:
        store = server.store
        found = store.lookup_prefix(keys)
        per_tier: dict[str, int] = {}
        for tier in store.tiers:
            depth = 0
            while depth < len(keys) and tier.contains(keys[depth]):
                depth += 1
            per_tier[tier.name] = depth
        return {"num_chunks": found.num_chunks, "tiers": list(found.tiers), "per_tier": per_tier}

    @app.get("/v1/lookup")
    def v1_lookup_get(request: Request, keys: str = "") -> dict[str, Any]:
        check(request)
        return lookup(_parse_keys([k for k in keys.split(",") if k]))

    @app.post("/v1/lookup")
    async def v1_lookup_post(request: Request) -> dict[str, Any]:
        check(request)
        body = await request.body()
        if len(body) > 64 * MAX_LOOKUP_KEYS + 1024:
            raise HTTPException(413, "request body too large")
        try:
            import msgspec

            data = msgspec.json.decode(body)
        except Exception as exc:
            raise HTTPException(400, 'body must be JSON {"keys": [hex, ...]}') from exc
        raw = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
            raise HTTPException(400, 'body must be JSON {"keys": [hex, ...]}')
        return lookup(_parse_keys(raw))

    @app.get("/v1/index/lookup")
    def v1_index_lookup(request: Request, keys: str = "") -> dict[str, Any]:
        """Which instances hold how long a prefix of these BLOCK keys, per tier (the global index)."""
        check(request)
        if server.index is None:
            raise HTTPException(404, "this server publishes to no block index")
        block_keys = _parse_keys([k for k in keys.split(",") if k])
        result: dict[str, Any] = server.index.lookup(block_keys).to_json()
        return result

    return app
