"""CLI commands of the server: ``kvstrata serve``, ``kvstrata stats``, ``kvstrata lookup``.

Heavy imports (torch, the Store, FastAPI) happen inside the commands so ``kvstrata --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Annotated, Any, Optional

import typer

__all__ = ["register"]


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            )
        except OSError:
            return False


def _read_token(path: str) -> bytes:
    from kvstrata.errors import ConfigError

    try:
        with open(path, "rb") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"the token in {path} is shorter than 16 bytes")
    return token


def serve(
    host: Annotated[Optional[str], typer.Option(help="Address of the data port [127.0.0.1].")] = None,
    port: Annotated[Optional[int], typer.Option(help="Data port (kvs:// protocol) [7470].")] = None,
    admin_port: Annotated[Optional[int], typer.Option(help="Admin HTTP port [7471]; 0 turns it off.")] = None,
    host_cache: Annotated[
        Optional[str], typer.Option(help="Host memory tier size, e.g. 4GiB [a fraction of free RAM].")
    ] = None,
    disk_cache: Annotated[Optional[str], typer.Option(help="Disk tier size [16GiB]; 0 turns it off.")] = None,
    disk_dir: Annotated[Optional[str], typer.Option(help="Disk tier directory [user cache dir].")] = None,
    slot_size: Annotated[
        Optional[str], typer.Option(help="Host tier slot size: the largest chunk [8MiB].")
    ] = None,
    index: Annotated[
        Optional[str], typer.Option(help="Block index: 'memory' or redis://host:port/db.")
    ] = None,
    token_file: Annotated[Optional[str], typer.Option(help="File holding the shared auth token.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback listener without a token.")
    ] = False,
    config: Annotated[Optional[str], typer.Option(help="TOML config file.")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Run the cache server daemon (data port + admin HTTP) until SIGTERM or SIGINT."""
    from kvstrata.config import load_config
    from kvstrata.errors import KVStrataError
    from kvstrata.logs import setup_logging
    from kvstrata.units import parse_size

    try:
        overrides: dict[str, Any] = {
            "log_level": log_level,
            "server": {
                "host": host,
                "port": port,
                "admin_port": admin_port,
                "token_file": token_file,
                "insecure": True if insecure else None,
            },
            "store": {
                "host_cache_bytes": None if host_cache is None else parse_size(host_cache),
                "disk_cache_bytes": None if disk_cache is None else parse_size(disk_cache),
                "disk_dir": disk_dir,
                "slot_bytes": None if slot_size is None else parse_size(slot_size),
            },
            "index": {"backend": index},
        }
        cfg = load_config(config, overrides)
        setup_logging(cfg.log_level)
        token = _read_token(cfg.server.token_file) if cfg.server.token_file else None
        if token is None and not cfg.server.insecure and not _is_loopback(cfg.server.host):
            typer.echo(
                f"refusing to listen on {cfg.server.host} without a token: pass --token-file, "
                "or --insecure to accept unauthenticated clients from the network",
                err=True,
            )
            raise typer.Exit(2)
        from kvstrata.server.daemon import run_daemon

        run_daemon(cfg, token)
    except KVStrataError as exc:
        typer.echo(f"kvstrata serve: {exc}", err=True)
        raise typer.Exit(1) from exc


def _client(server: str, token_file: str | None, timeout: float) -> Any:
    from kvstrata.client import Client

    token = _read_token(token_file) if token_file else None
    return Client(server, token=token, timeout=timeout)


def stats(
    server: Annotated[
        str, typer.Option(help="Server URL, e.g. kvs://127.0.0.1:7470.")
    ] = "kvs://127.0.0.1:7470",
    token_file: Annotated[Optional[str], typer.Option(help="File holding the shared auth token.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 5.0,
) -> None:
    """Print a server's per-tier and server counters as JSON."""
    from kvstrata.errors import KVStrataError

    try:
        with _client(server, token_file, timeout) as client:
            result = client.stats()
    except KVStrataError as exc:
        typer.echo(f"kvstrata stats: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(next(iter(result.values())), indent=2, sort_keys=True))


def lookup(
    keys: Annotated[list[str], typer.Argument(help="Chunk keys, 32 hex digits each, in prompt order.")],
    server: Annotated[
        str, typer.Option(help="Server URL, e.g. kvs://127.0.0.1:7470.")
    ] = "kvs://127.0.0.1:7470",
    token_file: Annotated[Optional[str], typer.Option(help="File holding the shared auth token.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 5.0,
) -> None:
    """How many leading chunks of KEYS a server holds, and in which tier (JSON)."""
    from kvstrata.errors import KVStrataError

    try:
        digests = [bytes.fromhex(k) for k in keys]
    except ValueError as exc:
        typer.echo(f"kvstrata lookup: keys are hex strings: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        with _client(server, token_file, timeout) as client:
            found = client.lookup_prefix(digests)
    except KVStrataError as exc:
        typer.echo(f"kvstrata lookup: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"num_chunks": found.num_chunks, "tiers": list(found.tiers), "keys": len(keys)}))


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``stats`` and ``lookup`` to the ``kvstrata`` command line."""
    app.command("serve")(serve)
    app.command("stats")(stats)
    app.command("lookup")(lookup)
