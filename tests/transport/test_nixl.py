"""The nixl transport end to end: real ``kvstrata serve`` processes, NIXL (UCX) DRAM-to-DRAM transfers.

The client side runs in a child process (``tests/transport/nixl_client.py``) so that no NIXL agent lives in
the pytest process (NIXL's teardown at interpreter exit has been seen to crash).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvstrata.client import Client
from kvstrata.errors import AuthenticationError
from tests.conftest import require
from tests.transport.nixl_client import chunk, key
from tests.transport.servers import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-shared-token-for-the-nixl-tests"
NIXL_ENV = {"KVSTRATA_SERVER_TRANSPORTS": "tcp,nixl"}


def _have_nixl() -> bool:
    try:
        return importlib.util.find_spec("nixl") is not None
    except (ImportError, ValueError):
        return False


@pytest.fixture(scope="module")
def nixl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    require(_have_nixl(), "nixl")
    tmp = tmp_path_factory.mktemp("nixl")
    (tmp / "token").write_text(TOKEN + "\n")
    server = ServeProcess(tmp, "--token-file", str(tmp / "token"), env=NIXL_ENV).start()
    try:
        yield server
    finally:
        try:
            if server.proc is not None and server.proc.poll() is None:
                server.terminate(timeout=20)
        finally:
            server.kill()


def _child(server: ServeProcess, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.transport.nixl_client",
            f"kvs+nixl://127.0.0.1:{server.port}",
            TOKEN,
            mode,
        ],
        cwd=ROOT,
        env={**os.environ, **NIXL_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_attach_needs_authentication(nixl_server: ServeProcess) -> None:
    # the pre-auth greeting must not carry the agent metadata (it names the server's registered memory)
    from kvstrata.transport.base import TransportOptions, parse_url
    from kvstrata.transport.tcp import TcpTransport

    plain = TcpTransport(
        parse_url(f"kvs://127.0.0.1:{nixl_server.port}"), TransportOptions(token=TOKEN.encode())
    )
    plain.connect(10.0)
    try:
        assert plain.greeting is not None and "nixl" in plain.greeting.transports
        assert "nixl" not in plain.greeting.extensions
    finally:
        plain.close()
    # a client without the token is refused at HELLO, before any NIXL exchange (no agent is created here)
    from kvstrata.transport.nixl import NixlTransport

    anon = NixlTransport(parse_url(f"kvs+nixl://127.0.0.1:{nixl_server.port}"), TransportOptions())
    with pytest.raises(AuthenticationError):
        anon.connect(10.0)
    assert anon.agent is None
    anon.close()


def test_round_trip_then_server_killed_mid_stream(nixl_server: ServeProcess) -> None:
    """One client process (one NIXL agent, started once): a conformance-style round trip, then a stream of
    puts and gets during which the server is killed with SIGKILL and restarted on the same port."""
    with Client(f"kvs://127.0.0.1:{nixl_server.port}", token=TOKEN) as tcp:
        tcp.put(key(7), chunk(7, 200_000))
    child = _child(nixl_server, "all")
    seen: list[str] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            seen.append(line)
            if line.strip() == "READY":
                break
        else:
            pytest.fail(
                "the nixl client never got going:\n"
                + "".join(seen)
                + (child.stderr.read() if child.stderr else "")
            )
        (first,) = _json_lines("".join(seen))
        assert first == {"phase": "roundtrip", "ok": True, "transport": "NixlTransport", "other_ok": True}
        # what the child put through NIXL reads back over tcp, byte for byte
        with Client(f"kvs://127.0.0.1:{nixl_server.port}", token=TOKEN) as tcp:
            got = tcp.get(key(103))
            assert got is not None and torch.equal(got, chunk(103, 4 * 1024**2))
        nixl_server.kill()  # SIGKILL mid-stream
        time.sleep(0.3)
        nixl_server.start()  # same port, a new server agent
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-4000:]
    (result,) = _json_lines(out)
    assert result["phase"] == "stream"
    assert result["wrong"] == 0, result
    assert int(result["errors"]) + int(result["misses"]) > 0, result  # type: ignore[call-overload]
    assert result["recovered"] is True, result
