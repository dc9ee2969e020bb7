"""Real components for the connector-parts tests: a ``kvstrata serve`` process, and a server that never
answers (a listening socket nobody reads). Unlike tests/connector, nothing here needs vLLM."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.transport.servers import ServeProcess


@pytest.fixture(scope="session")
def kvstrata_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One real ``kvstrata serve`` (tcp, 64 MiB host tier) for the session; tests use their own
    namespaces (a model id per test), so they never see each other's chunks."""
    server = ServeProcess(tmp_path_factory.mktemp("connector-serve")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """``kvs://`` URL of a socket that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"kvs://127.0.0.1:{sock.getsockname()[1]}"
