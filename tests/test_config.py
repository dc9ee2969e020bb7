"""The config model: precedence of sources, size parsing, clear errors."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from kvstrata.config import KVStrataConfig, describe, load_config
from kvstrata.errors import ConfigError
from kvstrata.units import format_size, parse_size


def test_defaults_are_embedded_and_loopback() -> None:
    cfg = load_config(environ={})
    assert cfg.server.host == "127.0.0.1"
    assert (cfg.server.port, cfg.server.admin_port) == (7470, 7471)
    assert cfg.index.backend == "memory"
    assert cfg.store.eviction == "lru"


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "kvstrata.toml"
    toml.write_text(
        'log_level = "debug"\n[server]\nport = 9000\nadmin_port = 9001\n[store]\nhost_cache_bytes = "2GiB"\n'
    )
    env = {"KVSTRATA_SERVER_PORT": "9100", "KVSTRATA_STORE_EVICTION": "s3fifo"}
    cfg = load_config(toml, overrides={"server": {"admin_port": 9200, "host": None}}, environ=env)
    assert cfg.log_level == "debug"  # file
    assert cfg.store.host_cache_bytes == 2 * 1024**3  # file, with units
    assert cfg.server.port == 9100  # env beats file
    assert cfg.store.eviction == "s3fifo"  # env
    assert cfg.server.admin_port == 9200  # override beats file
    assert cfg.server.host == "127.0.0.1"  # None override ignored


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[index]\nlease_ttl_s = 5\n")
    assert load_config(environ={"KVSTRATA_CONFIG": str(toml)}).index.lease_ttl_s == 5.0


def test_env_lists_and_bools() -> None:
    cfg = load_config(environ={"KVSTRATA_SERVER_TRANSPORTS": "tcp, nixl", "KVSTRATA_SERVER_INSECURE": "true"})
    assert cfg.server.transports == ("tcp", "nixl")
    assert cfg.server.insecure is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KVSTRATA_SERVER_PORT": "abc"}, "port"),
        ({"KVSTRATA_SERVER_NOPE": "1"}, "KVSTRATA_SERVER_NOPE"),
        ({"KVSTRATA_STORE_EVICTION": "fifo"}, "eviction"),
        ({"KVSTRATA_STORE_HOST_CACHE_BYTES": "12 parsecs"}, "unit"),
    ],
)
def test_bad_values_name_the_field(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=env)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(unknown, environ={})


def test_config_is_immutable_and_replace_copies() -> None:
    cfg = KVStrataConfig()
    with pytest.raises(AttributeError):
        cfg.log_level = "debug"  # type: ignore[misc]
    other = cfg.replace(server={"port": 1234})
    assert other.server.port == 1234 and cfg.server.port == 7470
    assert msgspec.to_builtins(other)["server"]["host"] == "127.0.0.1"


def test_every_field_is_documented() -> None:
    rows = describe()
    assert len(rows) > 20
    assert all(doc for _name, _value, doc in rows), [name for name, _v, doc in rows if not doc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("512MiB", 512 * 1024**2),
        ("4GiB", 4 * 1024**3),
        ("1.5 KiB", 1536),
        ("2GB", 2 * 10**9),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "-1", "GiB", "4 XB", "four"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(3 * 1024**3 // 2) == "1.5 GiB"
