"""CLI commands of the index: ``kvstrata index run`` and ``kvstrata index query``.

``run`` subscribes to engines' KV-event endpoints and writes into a backend: the memory backend is served
over HTTP (:mod:`kvstrata.index.http`) from the same process; with Redis, every router reads the shared
index directly (HTTP is then optional). ``query`` asks either about a prompt given as token ids.
Keys are computed in the namespace named by ``--model``, ``--fingerprint`` (the KV layout fingerprint, 32 hex
digits) and ``--salt``: the ingester, the routers and ``query`` must name the same one.
Heavy imports happen inside the commands so ``kvstrata --help`` stays fast.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Annotated, Any, Optional

import typer

__all__ = ["register"]

index_app = typer.Typer(
    name="index",
    help="The global block index: ingest engine KV events, answer prefix lookups.",
    no_args_is_help=True,
)

ModelOpt = Annotated[str, typer.Option("--model", help="Model id of the key namespace.")]
FingerprintOpt = Annotated[
    str, typer.Option("--fingerprint", help="KV layout fingerprint, 32 hex digits (all zeros: unspecified).")
]
SaltOpt = Annotated[str, typer.Option("--salt", help="Tenant salt of the key namespace.")]
BlockSizeOpt = Annotated[int, typer.Option("--block-size", help="Engine block size, in tokens.")]
_ZERO_FP = "0" * 32


def _namespace(model: str, fingerprint: str, salt: str) -> Any:
    from kvstrata.core.keys import Namespace
    from kvstrata.errors import InvalidArgumentError

    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError as exc:
        raise InvalidArgumentError("--fingerprint is 32 hex digits") from exc
    return Namespace(model, raw, salt.encode())


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@index_app.command("run")
def run(
    endpoint: Annotated[
        list[str],
        typer.Option(
            "--endpoint",
            help="Engine KV-event endpoint, repeatable: tcp://host:port[?instance=NAME&replay=tcp://…&bind=1].",
        ),
    ],
    backend: Annotated[Optional[str], typer.Option(help="'memory' or redis://host:port/db [memory].")] = None,
    http_host: Annotated[str, typer.Option(help="Address of the HTTP lookup port.")] = "127.0.0.1",
    http_port: Annotated[
        Optional[int], typer.Option(help="HTTP lookup port [7472 with memory, off with Redis]; 0: off.")
    ] = None,
    model: ModelOpt = "default",
    fingerprint: FingerprintOpt = _ZERO_FP,
    salt: SaltOpt = "",
    block_size: BlockSizeOpt = 16,
    config: Annotated[Optional[str], typer.Option(help="TOML config file.")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Ingest engines' KV events into the index; serve HTTP lookups (memory backend) until SIGINT/SIGTERM."""
    from kvstrata.config import load_config
    from kvstrata.errors import KVStrataError
    from kvstrata.index.base import open_index
    from kvstrata.index.ingest import EventIngester, parse_endpoint
    from kvstrata.logs import setup_logging

    try:
        cfg = load_config(config, {"log_level": log_level, "index": {"backend": backend}})
        setup_logging(cfg.log_level)
        ns = _namespace(model, fingerprint, salt)
        specs = [parse_endpoint(e) for e in endpoint]
        index = open_index(cfg.index.backend, namespace=ns.id.hex(), config=cfg.index)
        ingester = EventIngester(
            index,
            ns,
            specs,
            replay_timeout_s=cfg.index.replay_timeout_s,
            max_engine_hashes=cfg.index.max_engine_hashes,
            heartbeat_s=max(0.1, cfg.index.lease_ttl_s / 3),
        )
    except KVStrataError as exc:
        _fail(str(exc))
        return
    if http_port is None:
        http_port = cfg.index.http_port if cfg.index.backend == "memory" else 0
    ingester.start()
    typer.echo(f"kvstrata index: ingesting {len(specs)} endpoint(s) into {cfg.index.backend}", err=True)
    try:
        if http_port:
            import uvicorn

            from kvstrata.index.http import make_app

            app = make_app(index, ns, block_size=block_size, ingester=ingester)
            typer.echo(f"kvstrata index: HTTP lookups on http://{http_host}:{http_port}", err=True)
            uvicorn.run(app, host=http_host, port=http_port, log_level="warning")
        else:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    finally:
        ingester.close()
        index.close()


def _read_tokens(tokens: Optional[str], tokens_file: Optional[str]) -> list[int]:
    if (tokens is None) == (tokens_file is None):
        _fail("give exactly one of --tokens and --tokens-file")
    text = tokens if tokens is not None else open(str(tokens_file)).read()  # noqa: SIM115 - read once
    text = text.strip()
    try:
        values = (
            json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
        )
    except ValueError:
        _fail("token ids are integers, comma- or space-separated, or a JSON list")
        return []
    if not all(isinstance(v, int) for v in values):
        _fail("token ids are integers")
    return [int(v) for v in values]


@index_app.command("query")
def query(
    tokens: Annotated[Optional[str], typer.Option(help="Prompt token ids: '1,2,3' or a JSON list.")] = None,
    tokens_file: Annotated[Optional[str], typer.Option(help="File holding the prompt token ids.")] = None,
    url: Annotated[
        Optional[str], typer.Option(help="HTTP address of `kvstrata index run` [http://127.0.0.1:7472].")
    ] = None,
    backend: Annotated[
        Optional[str], typer.Option(help="Ask a redis:// index directly instead of over HTTP.")
    ] = None,
    model: ModelOpt = "default",
    fingerprint: FingerprintOpt = _ZERO_FP,
    salt: SaltOpt = "",
    block_size: BlockSizeOpt = 16,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 5.0,
) -> None:
    """Ask the index which instances hold how long a prefix of a prompt, per tier (JSON on stdout)."""
    from kvstrata.errors import KVStrataError

    ids = _read_tokens(tokens, tokens_file)
    try:
        if backend is not None:
            from kvstrata.config import IndexConfig
            from kvstrata.core.keys import block_keys
            from kvstrata.index.base import open_index

            ns = _namespace(model, fingerprint, salt)
            index = open_index(backend, namespace=ns.id.hex(), config=IndexConfig(redis_timeout_s=timeout))
            try:
                result = index.lookup(block_keys(ns, ids, block_size))
            finally:
                index.close()
            out = {**result.to_json(), "block_size": block_size}
        else:
            import httpx

            target = (url or "http://127.0.0.1:7472").rstrip("/") + "/lookup"
            try:
                reply = httpx.post(target, json={"tokens": ids, "block_size": block_size}, timeout=timeout)
            except httpx.HTTPError as exc:
                _fail(f"cannot reach {target}: {exc}")
                return
            if reply.status_code != 200:
                _fail(f"{target} answered {reply.status_code}: {reply.text}")
            out = reply.json()
    except KVStrataError as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(out))


def register(app: typer.Typer) -> None:
    """Add the ``index`` sub-command group to the ``kvstrata`` CLI."""
    app.add_typer(index_app, name="index")
