"""End to end against real ``kvstrata serve`` processes: data, CLI, admin API, auth, faults, fuzzing."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstrata.client import Client
from kvstrata.core.keys import ChunkKey
from kvstrata.errors import AuthenticationError, KVStrataError, TransportError, VersionMismatchError
from kvstrata.transport import protocol as p
from tests.kvstore.conformance_tier import check_stamped, chunk_key, stamped
from tests.transport.servers import ServeProcess, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    proc = ServeProcess(tmp_path_factory.mktemp("serve")).start()
    yield proc
    proc.kill()


def raw_connect(port: int) -> tuple[socket.socket, p.ServerHello]:
    """A raw socket after a successful HELLO (no token)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    header = p.parse_header(_recv(sock, p.HEADER_SIZE), 1 << 30)
    greeting = p.decode_meta(header.opcode, True, _recv(sock, header.meta_len), kind=p.ServerHello)
    hello = p.encode_meta(p.ClientHello(version=p.PROTOCOL_VERSION, nonce=os.urandom(32)))
    sock.sendall(p.pack_header(p.Op.HELLO, 1, len(hello)) + hello)
    reply = p.parse_header(_recv(sock, p.HEADER_SIZE), 1 << 30)
    _recv(sock, reply.meta_len)
    assert reply.opcode == p.Op.HELLO
    return sock, greeting


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def test_put_get_and_queries(server: ServeProcess) -> None:
    with Client(server.url, timeout=10) as client:
        key = chunk_key(1, b"e2e")
        data = torch.randn(4096, dtype=torch.float32)
        client.put(key, data)
        got = client.get(key)
        assert got is not None and got.dtype == torch.uint8
        assert torch.equal(got.view(torch.float32), data)
        out = torch.zeros(4096, dtype=torch.float32)
        view = client.get(key, out=out)
        assert view is not None and view.data_ptr() == out.data_ptr() and torch.equal(out, data)
        assert client.get(chunk_key(2, b"e2e")) is None
        ck = ChunkKey(chunk_key(3, b"e2e"), (chunk_key(4, b"e2e"), chunk_key(3, b"e2e")))
        client.put_many([ck, chunk_key(5, b"e2e")], [b"a" * 1000, bytearray(b"b" * 3000)])
        many = client.get_many([ck, chunk_key(6, b"e2e"), chunk_key(5, b"e2e")])
        assert many[0] is not None and bytes(many[0].numpy()) == b"a" * 1000
        assert many[1] is None
        assert many[2] is not None and bytes(many[2].numpy()) == b"b" * 3000
        keys = [key, ck.digest, chunk_key(6, b"e2e"), chunk_key(5, b"e2e")]
        assert client.exists(keys) == [True, True, False, True]
        found = client.lookup_prefix(keys)
        assert found.num_chunks == 2 and found.tiers == ("host", "host")
        stats = client.stats()[server.url]
        assert stats["tiers"]["host"]["chunks"] >= 3
        assert client.delete([chunk_key(5, b"e2e"), chunk_key(6, b"e2e")]) == 1
        assert client.get(chunk_key(5, b"e2e")) is None


def test_cli_stats_and_lookup(server: ServeProcess) -> None:
    from typer.testing import CliRunner

    from kvstrata.cli import app

    key = chunk_key(10, b"cli")
    with Client(server.url) as client:
        client.put(key, b"z" * 100)
    runner = CliRunner()
    out = runner.invoke(app, ["stats", "--server", server.url])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["tiers"]["host"]["chunks"] >= 1
    out = runner.invoke(app, ["lookup", "--server", server.url, key.hex(), chunk_key(11).hex()])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"num_chunks": 1, "tiers": ["host"], "keys": 2}
    out = runner.invoke(app, ["lookup", "--server", server.url, "not-hex"])
    assert out.exit_code == 2
    out = runner.invoke(app, ["stats", "--server", "kvs://127.0.0.1:1", "--timeout", "1"])
    assert out.exit_code == 1 and "cannot connect" in out.output


def test_admin_api(server: ServeProcess) -> None:
    key = chunk_key(20, b"admin")
    with Client(server.url) as client:
        client.put(key, b"q" * 64)
    base = f"http://127.0.0.1:{server.admin_port}"
    assert wait_until(lambda: _ok(base + "/readyz"), timeout=20)
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    stats = httpx.get(base + "/v1/stats").json()
    assert set(stats["tiers"]["host"]) >= {"chunks", "hits", "misses", "evictions", "errors"}
    assert "kvstrata_tier_hits_total" in httpx.get(base + "/metrics").text
    found = httpx.get(base + "/v1/lookup", params={"keys": f"{key.hex()},{chunk_key(21).hex()}"}).json()
    assert found == {"num_chunks": 1, "tiers": ["host"], "per_tier": {"host": 1}}
    posted = httpx.post(base + "/v1/lookup", json={"keys": [key.hex()]}).json()
    assert posted["num_chunks"] == 1
    assert httpx.get(base + "/v1/lookup", params={"keys": "zz"}).status_code == 400


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_auth_required_wrong_token_refused_and_sigterm(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    proc = ServeProcess(tmp_path, "--token-file", str(token_file)).start()
    try:
        with pytest.raises(AuthenticationError, match="requires a token"):
            Client(proc.url).get(chunk_key(1))
        with pytest.raises(AuthenticationError):
            Client(proc.url, token="wrong-token-0123456789").get(chunk_key(1))
        with Client(proc.url, token="s3cret-token-0123456789") as client:
            client.put(chunk_key(1), b"ok")
            assert client.get(chunk_key(1)) is not None
        base = f"http://127.0.0.1:{proc.admin_port}"
        assert wait_until(lambda: _ok(base + "/healthz"), timeout=20)
        assert httpx.get(base + "/v1/stats").status_code == 401
        headers = {"Authorization": "Bearer s3cret-token-0123456789"}
        assert httpx.get(base + "/v1/stats", headers=headers).status_code == 200
        # A raw client that skips HELLO is refused too.
        sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
        header = p.parse_header(_recv(sock, p.HEADER_SIZE), 1 << 30)
        _recv(sock, header.meta_len)
        meta = p.encode_meta(p.KeysRequest(keys=[chunk_key(1)]))
        sock.sendall(p.pack_header(p.Op.EXISTS, 5, len(meta)) + meta)
        reply = p.parse_header(_recv(sock, p.HEADER_SIZE), 1 << 30)
        assert reply.opcode == p.Op.ERROR
        assert p.decode_meta(reply.opcode, True, _recv(sock, reply.meta_len)).code == "auth"
        sock.close()
        # SIGTERM: in-flight work finishes, the process exits 0 and says so.
        assert proc.terminate(timeout=30) == 0
        log = proc.output()
        assert "data port listening on kvs://127.0.0.1" in log and "tier host" in log
        assert "auth: token" in log and "stopped" in log
    finally:
        proc.kill()


def test_non_loopback_bind_without_token_is_refused() -> None:
    from typer.testing import CliRunner

    from kvstrata.cli import app

    args = [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--disk-cache",
        "0",
        "--index",
        "redis://127.0.0.1:1/0",
    ]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2
    assert "without a token" in out.output
    help_text = CliRunner().invoke(app, ["serve", "--help"]).output
    for flag in (
        "--host-cache",
        "--disk-cache",
        "--disk-dir",
        "--index",
        "--token-file",
        "--insecure",
        "--config",
    ):
        assert flag in help_text


def test_version_mismatch_fails_at_hello(server: ServeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    header = p.parse_header(_recv(sock, p.HEADER_SIZE), 1 << 30)
    _recv(sock, header.meta_len)
    hello = p.encode_meta(p.ClientHello(version=2))
    sock.sendall(p.pack_header(p.Op.HELLO, 1, len(hello), version=2) + hello)
    reply = p.parse_header(_recv(sock, p.HEADER_SIZE), 1 << 30)
    err = p.decode_meta(reply.opcode, True, _recv(sock, reply.meta_len))
    assert err.code == "version_mismatch" and "version 1" in err.message
    assert sock.recv(1) == b"", "the server closes the connection"
    sock.close()
    # And a client meeting a server of another version fails at once, naming both versions.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake_server() -> None:
        conn, _ = listener.accept()
        meta = p.encode_meta(p.ServerHello(version=2))
        conn.sendall(p.pack_header(p.Op.HELLO, 0, len(meta), flags=p.Flag.REPLY, version=2) + meta)
        time.sleep(0.5)
        conn.close()

    thread = threading.Thread(target=fake_server)
    thread.start()
    with Client(f"kvs://127.0.0.1:{port}") as client, pytest.raises(VersionMismatchError, match="version 2"):
        client.get(chunk_key(1))
    thread.join()
    listener.close()


def test_kill9_during_stream_then_reconnect(tmp_path: Path) -> None:
    proc = ServeProcess(tmp_path).start()
    client = Client(proc.url, timeout=3, retry_backoff=0.05, max_backoff=0.5)
    keys = [chunk_key(i, b"kill") for i in range(8)]
    nbytes = 256 * 1024
    wrong: list[str] = []
    outcomes = {"hit": 0, "miss": 0, "error": 0}
    stop = threading.Event()

    def stream() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            key = keys[version % len(keys)]
            try:
                client.put(key, stamped(key, nbytes, version))
                got = client.get(key)
            except TransportError:
                outcomes["error"] += 1
                time.sleep(0.01)
                continue
            if got is None:
                outcomes["miss"] += 1
                continue
            try:
                check_stamped(key, got)
                outcomes["hit"] += 1
            except AssertionError as exc:
                wrong.append(str(exc))

    thread = threading.Thread(target=stream)
    thread.start()
    assert wait_until(lambda: outcomes["hit"] > 10, timeout=30)
    proc.kill()
    assert wait_until(lambda: outcomes["error"] > 0, timeout=10)
    proc.start()  # on the same port
    hits = outcomes["hit"]
    assert wait_until(lambda: outcomes["hit"] > hits + 5, timeout=30), "the client reconnects"
    stop.set()
    thread.join(30)
    client.close()
    proc.kill()
    assert not wrong, wrong[:3]


def test_slow_client_that_never_reads(server: ServeProcess) -> None:
    proc = server
    keys = [chunk_key(i, b"slow") for i in range(8)]
    with Client(proc.url, timeout=10) as client:
        client.put_many(keys, [stamped(k, 4 << 20, 1) for k in keys])
        time.sleep(0.3)
        before = proc.rss_bytes()
        sock, _ = raw_connect(proc.port)
        sock.setblocking(False)
        request = p.encode_meta(p.KeysRequest(keys=keys))
        frame = p.pack_header(p.Op.GET_MANY, 9, len(request)) + request
        sent = 0
        for _ in range(500):  # 500 x 32 MiB of replies requested, never read
            try:
                sock.send(frame)
                sent += 1
            except BlockingIOError:
                break
        time.sleep(1.0)
        # Other clients are unaffected while the slow one stalls.
        start = time.monotonic()
        for _ in range(5):
            for key, got in zip(keys, client.get_many(keys), strict=True):
                assert got is not None
                check_stamped(key, got)
        assert time.monotonic() - start < 20
        grown = proc.rss_bytes() - before
        assert sent > 0
        assert grown < 48 << 20, f"server RSS grew by {grown >> 20} MiB for a client that never reads"
        sock.close()


def _mutated_put(position: int, value: int, cut: int) -> bytes:
    """A valid PUT frame with one byte changed, then cut short by ``cut`` bytes (0: whole)."""
    payload = bytes(range(256)) * 4
    meta = p.encode_meta(p.PutRequest(key=chunk_key(5, b"fuzz")))
    frame = bytearray(
        p.pack_header(
            p.Op.PUT, 3, len(meta), len(payload), flags=p.Flag.CHECKSUM, checksum=p.checksum(payload)
        )
        + meta
        + payload
    )
    frame[position % len(frame)] = value
    return bytes(frame[: len(frame) - cut])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda op, meta_len, payload_len, tail: (
                p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, op, 0, 3, meta_len, payload_len, 0) + tail
            ),
            st.sampled_from([int(o) for o in p.Op] + [0x30, 0x45]),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**40),
            st.binary(max_size=100),
        ),
        st.builds(_mutated_put, st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 120)),
    )
)
def test_live_server_survives_fuzzed_frames(server: ServeProcess, data: bytes) -> None:
    sock, _ = raw_connect(server.port)
    sock.settimeout(3)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        # The server answers with typed frames or closes; it never hangs on a half-sent frame.
        decoder = p.FrameDecoder(1 << 30, replies=True)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for frame in decoder.feed(chunk):
                if frame.header.opcode == p.Op.ERROR:
                    assert frame.meta.code in p.ERROR_CODES
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    with Client(server.url, timeout=5) as client:  # and keeps serving everyone else
        client.put(chunk_key(99, b"fuzz"), b"alive")
        got = client.get(chunk_key(99, b"fuzz"))
        assert got is not None and bytes(got.numpy()) == b"alive"


def test_errors_are_typed(server: ServeProcess) -> None:
    with Client(server.url) as client, pytest.raises(KVStrataError):
        client.put(chunk_key(1), torch.zeros(5 << 20, dtype=torch.uint8))  # larger than a 4 MiB slot
