"""The public face of the package is pinned: a change to it is a deliberate API change."""

from __future__ import annotations

import subprocess
import sys

import kvstrata
from kvstrata import errors


def test_public_names_are_pinned() -> None:
    assert kvstrata.__all__ == [
        "__version__",
        "AsyncClient",
        "ChunkKey",
        "ChunkMeta",
        "Client",
        "ConnectError",
        "KVLayout",
        "KVStrataConfig",
        "KVStrataError",
        "Namespace",
        "RequestTimeoutError",
        "Store",
        "StoreError",
        "TransportError",
        "block_keys",
        "chunk_keys",
        "load_config",
    ]


def test_every_public_name_resolves() -> None:
    for name in kvstrata.__all__:
        assert getattr(kvstrata, name) is not None


def test_exception_tree_has_one_root() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.KVStrataError), name
        assert cls.__doc__, name
        assert name in (errors.__doc__ or ""), f"{name} missing from the drawn tree"


def test_cli_version_and_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvstrata.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"kvstrata {kvstrata.__version__}"
    helptext = subprocess.run(
        [sys.executable, "-m", "kvstrata.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "config" in helptext


def test_cli_config_prints_fields() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvstrata.cli", "config"],
        capture_output=True,
        text=True,
        check=True,
        env={"KVSTRATA_SERVER_PORT": "7999", "PATH": ""},
    ).stdout
    assert "server.port = 7999" in out
