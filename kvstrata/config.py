"""One immutable, typed configuration model for every part of kvstrata.

Sources, lowest precedence first: the defaults below < a TOML file < ``KVSTRATA_*`` environment variables <
explicit overrides (CLI flags, or vLLM's ``kv_connector_extra_config``). Every field carries a one-line
description (``msgspec.Meta(description=...)``), printed by ``kvstrata config``.

Environment variables name a section and a field: ``KVSTRATA_SERVER_PORT=7480``,
``KVSTRATA_STORE_HOST_CACHE_BYTES=4GiB``, ``KVSTRATA_LOG_LEVEL=debug``. Fields whose name ends in ``_bytes``
accept sizes with units (``512MiB``, ``4GiB``). The TOML file has the same sections::

    log_level = "info"
    [store]
    host_cache_bytes = "8GiB"
    disk_dir = "/var/cache/kvstrata"
    [server]
    port = 7470

Call order: ``load_config(path, overrides)`` once at start-up, then pass the frozen object (or its sections)
down. A bad value raises :class:`kvstrata.errors.ConfigError` naming the source and the field.
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from kvstrata.errors import ConfigError
from kvstrata.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ClientConfig",
    "ConnectorConfig",
    "IndexConfig",
    "KVStrataConfig",
    "KernelConfig",
    "ServerConfig",
    "StoreConfig",
    "default_cache_dir",
    "describe",
    "load_config",
]

ENV_PREFIX = "KVSTRATA_"


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


def default_cache_dir() -> str:
    """The per-user cache directory where the disk tier lives by default."""
    import platformdirs

    return str(Path(platformdirs.user_cache_dir("kvstrata")) / "chunks")


class StoreConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The tiered store: which tiers exist, their sizes and policies."""

    device_cache_bytes: Annotated[int, _doc("GPU chunk pool size; 0 turns the device tier off")] = 0
    device: Annotated[str, _doc("torch device of the device tier: 'auto' (cuda when present) or a name")] = (
        "auto"
    )
    host_cache_bytes: Annotated[
        int, _doc("host (pinned) memory pool size; 0 means a fraction of available RAM")
    ] = 0
    host_cache_fraction: Annotated[
        float, _doc("fraction of available RAM for the host tier when host_cache_bytes is 0")
    ] = 0.25
    slot_bytes: Annotated[int, _doc("host tier slot size: the largest chunk it holds")] = 8 * 1024**2
    disk_cache_bytes: Annotated[int, _doc("disk tier size bound; 0 turns the disk tier off")] = 16 * 1024**3
    disk_dir: Annotated[str, _doc("directory of the disk tier; empty means the user cache directory")] = ""
    disk_fsync: Annotated[bool, _doc("fsync each disk chunk before it becomes visible")] = False
    eviction: Annotated[Literal["lru", "s3fifo"], _doc("eviction policy of every tier")] = "lru"
    write_through: Annotated[
        bool, _doc("copy every put to all lower tiers at once instead of on eviction")
    ] = False
    demotion_queue: Annotated[int, _doc("bound of the background demotion queue, in chunks")] = 256
    demotion_workers: Annotated[int, _doc("background demotion worker threads")] = 1
    codec: Annotated[
        Literal["none", "fp8", "int8"], _doc("KV compression applied when chunks leave the device")
    ] = "none"


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The cache server daemon (`kvstrata serve`)."""

    host: Annotated[str, _doc("address the data port listens on")] = "127.0.0.1"
    port: Annotated[int, _doc("data port (the kvs:// wire protocol)")] = 7470
    admin_port: Annotated[int, _doc("admin HTTP port: health, metrics, stats, lookup")] = 7471
    token_file: Annotated[str, _doc("file holding the shared auth token; empty means no auth")] = ""
    insecure: Annotated[bool, _doc("allow a non-loopback listener without a token")] = False
    transports: Annotated[tuple[str, ...], _doc("transports offered: tcp, shm, nixl")] = ("tcp", "shm")
    max_payload_bytes: Annotated[int, _doc("largest payload one frame may carry")] = 256 * 1024**2
    max_connections: Annotated[int, _doc("concurrent client connections accepted")] = 1024
    max_inflight_bytes: Annotated[
        int, _doc("bytes buffered for one connection before the server stops reading from it")
    ] = 64 * 1024**2
    write_timeout_s: Annotated[
        float, _doc("seconds a reply may wait on a client that does not read before it is disconnected")
    ] = 30.0
    bulk_threads: Annotated[
        int,
        _doc(
            "threads reading put payloads over 1 MiB, blocking, while several connections are served"
            " (0: all on the event loop)"
        ),
    ] = 8


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Python client and the remote tier."""

    timeout_s: Annotated[float, _doc("per-call timeout in seconds")] = 5.0
    connect_timeout_s: Annotated[float, _doc("connection timeout in seconds")] = 2.0
    pool_size: Annotated[int, _doc("connections kept per server")] = 4
    retry_backoff_s: Annotated[float, _doc("first reconnect back-off; doubles up to 30 s")] = 0.2


class IndexConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The global block index."""

    backend: Annotated[str, _doc("'memory' (embedded) or a redis:// URL")] = "memory"
    lease_ttl_s: Annotated[
        float, _doc("an instance that does not heartbeat for this long stops counting")
    ] = 30.0
    max_blocks: Annotated[int, _doc("bound of the memory backend, in blocks (LRU beyond it)")] = 4_000_000
    write_buffer: Annotated[int, _doc("bound of the buffer of writes retried while Redis is down")] = 100_000
    max_instances: Annotated[
        int, _doc("instances (and cleared epochs awaiting reclaim) the memory backend tracks")
    ] = 1024
    flush_interval_s: Annotated[float, _doc("how often buffered Redis writes are sent, at the latest")] = (
        0.005
    )
    redis_timeout_s: Annotated[float, _doc("Redis socket timeout; a lookup past it answers 'no match'")] = 0.5
    block_ttl_s: Annotated[int, _doc("Redis expiry of a block entry, renewed on write; 0 keeps entries")] = (
        86_400
    )
    replay_timeout_s: Annotated[float, _doc("how long to wait for a KV-event replay before giving up")] = 1.0
    max_engine_hashes: Annotated[
        int, _doc("engine block hashes remembered per engine to apply BlockRemoved (LRU beyond it)")
    ] = 1_000_000
    http_port: Annotated[int, _doc("port of `kvstrata index run --backend memory` HTTP lookups")] = 7472
    prefill_tokens_per_s: Annotated[float, _doc("scoring: tokens per second an instance prefills")] = 5000.0
    host_gib_per_s: Annotated[float, _doc("scoring: fetch bandwidth from the host tier")] = 8.0
    disk_gib_per_s: Annotated[float, _doc("scoring: fetch bandwidth from the disk tier")] = 1.0
    remote_gib_per_s: Annotated[float, _doc("scoring: fetch bandwidth from the remote tier")] = 2.0


class KernelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Paging and compression kernels."""

    backend: Annotated[
        Literal["auto", "triton", "torch"], _doc("'auto': Triton on CUDA, the torch reference elsewhere")
    ] = "auto"


class ConnectorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The vLLM connector (``[connector]``; in vLLM, ``kv_connector_extra_config``)."""

    servers: Annotated[
        tuple[str, ...],
        _doc("cache servers (kvs://, kvs+shm://, kvs+nixl://); empty keeps a Store inside each worker"),
    ] = ()
    model_id: Annotated[str, _doc("the model's name in the key namespace; empty means vLLM's model name")] = (
        ""
    )
    tenant_salt: Annotated[str, _doc("salt of the key namespace: engines with other salts share nothing")] = (
        ""
    )
    chunk_tokens: Annotated[
        int, _doc("tokens per stored chunk; 0 means 256 rounded up to a multiple of the block size")
    ] = 0
    load: Annotated[bool, _doc("load KV kvstrata holds into new requests")] = True
    save: Annotated[bool, _doc("save computed KV (prompt and, with save_decode, decode) into kvstrata")] = (
        True
    )
    save_decode: Annotated[
        bool, _doc("save chunks filled during decode too (a chat's next turn reuses them)")
    ] = True
    lookup_timeout_s: Annotated[
        float, _doc("deadline of a scheduler lookup on the servers; past it the request is a miss")
    ] = 0.5
    lookup_wait_s: Annotated[
        float, _doc("how long the scheduler waits for a server lookup before asking vLLM to retry later")
    ] = 0.002
    snapshot_wait_s: Annotated[
        float, _doc("embedded: how long new requests wait for the workers' first catalog (after a restart)")
    ] = 5.0
    load_timeout_s: Annotated[
        float, _doc("deadline of a load from the servers; past it the blocks recompute")
    ] = 5.0
    max_pending_save_bytes: Annotated[
        int,
        _doc("bound of the chunks gathered and not yet pushed to the servers; beyond it saves are dropped"),
    ] = 256 * 1024**2
    publish_index: Annotated[bool, _doc("write what this engine holds into the [index] backend")] = False
    events: Annotated[bool, _doc("put kvstrata's tier events into vLLM's KV-event stream")] = True


class KVStrataConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration."""

    log_level: Annotated[str, _doc("logging level: debug, info, warning, error")] = "info"
    instance_id: Annotated[str, _doc("this instance's name in the index; empty means hostname:port")] = ""
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    client: ClientConfig = msgspec.field(default_factory=ClientConfig)
    index: IndexConfig = msgspec.field(default_factory=IndexConfig)
    kernels: KernelConfig = msgspec.field(default_factory=KernelConfig)
    connector: ConnectorConfig = msgspec.field(default_factory=ConnectorConfig)

    def replace(self, **sections: Any) -> KVStrataConfig:
        """A copy with some top-level fields or whole sections replaced (sections may be given as dicts)."""
        merged = msgspec.to_builtins(self)
        _deep_merge(merged, sections, "override")
        return _convert(merged, "override")


_SECTIONS = ("store", "server", "client", "index", "kernels", "connector")


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any], source: str) -> None:
    for name, value in extra.items():
        if isinstance(value, msgspec.Struct):
            value = msgspec.to_builtins(value)
        if isinstance(value, Mapping):
            if not isinstance(base.get(name), dict):
                raise ConfigError(f"{source}: {name!r} is not a config section")
            _deep_merge(base[name], value, f"{source}: [{name}]")
        else:
            base[name] = value


def _normalise_sizes(data: dict[str, Any]) -> None:
    for name, value in list(data.items()):
        if isinstance(value, dict):
            _normalise_sizes(value)
        elif name.endswith("_bytes") and isinstance(value, str):
            data[name] = parse_size(value)


def _convert(data: dict[str, Any], source: str) -> KVStrataConfig:
    try:
        _normalise_sizes(data)
        return msgspec.convert(data, KVStrataConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    top_fields = {f.name for f in msgspec.structs.fields(KVStrataConfig)} - set(_SECTIONS)
    section_types = {f.name: f.type for f in msgspec.structs.fields(KVStrataConfig) if f.name in _SECTIONS}
    out: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest in top_fields:
            out[rest] = raw
            continue
        for section, stype in section_types.items():
            if rest.startswith(section + "_"):
                field = rest[len(section) + 1 :]
                names = {f.name: f for f in msgspec.structs.fields(stype)}
                if field not in names:
                    raise ConfigError(f"environment: {var} names no field of [{section}]")
                value: Any = raw
                if "tuple" in str(names[field].type):
                    value = tuple(part.strip() for part in raw.split(",") if part.strip())
                elif "bool" in str(names[field].type):
                    value = raw.strip().lower() in ("1", "true", "yes", "on")
                out.setdefault(section, {})[field] = value
                break
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> KVStrataConfig:
    """Build the configuration: defaults < TOML file at ``path`` < ``KVSTRATA_*`` env < ``overrides``.

    ``overrides`` is a nested mapping such as ``{"server": {"port": 7480}}``; ``None`` values are ignored so
    that unset CLI flags do not override anything.
    """
    data = msgspec.to_builtins(KVStrataConfig())
    if path is None:
        path = (environ if environ is not None else os.environ).get("KVSTRATA_CONFIG") or None
    if path is not None:
        try:
            with open(path, "rb") as fh:
                file_data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        _deep_merge(data, file_data, f"config file {path}")
        _convert(data, f"config file {path}")
    env = dict(environ if environ is not None else os.environ)
    env.pop("KVSTRATA_CONFIG", None)
    _deep_merge(data, _env_overrides(env), "environment")
    _convert(data, "environment")
    if overrides:
        _deep_merge(data, _drop_none(overrides), "override")
    return _convert(data, "override" if overrides else "environment")


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if value is None:
            continue
        out[key] = _drop_none(value) if isinstance(value, Mapping) else value
    return out


def describe(config: KVStrataConfig | None = None) -> list[tuple[str, Any, str]]:
    """(dotted name, value, description) of every field: what `kvstrata config` prints."""
    config = config or KVStrataConfig()
    rows: list[tuple[str, Any, str]] = []

    def walk(obj: msgspec.Struct, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj), include_extras=True)
        for info in msgspec.structs.fields(type(obj)):
            value = getattr(obj, info.name)
            if isinstance(value, msgspec.Struct):
                walk(value, f"{prefix}{info.name}.")
                continue
            metas = getattr(hints.get(info.name), "__metadata__", ())
            doc = next((m.description for m in metas if isinstance(m, msgspec.Meta) and m.description), "")
            rows.append((prefix + info.name, value, doc))

    walk(config, "")
    return rows
