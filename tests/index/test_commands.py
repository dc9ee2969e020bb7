"""`kvstrata index run` / `kvstrata index query` as real processes, fed by a vLLM-format publisher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvstrata.core.keys import Namespace, block_keys
from kvstrata.index.base import open_index
from tests.conftest import RedisServer, free_port, wait_for_port
from tests.index.test_events import BS, MapBlockRemoved, VllmLikePublisher, hashes_of, stored_events

ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT = "00112233445566778899aabbccddeeff"
NS = Namespace("tiny-llama", bytes.fromhex(FINGERPRINT))
TOKENS = list(range(7, 7 + 10 * BS + 3))  # 10 full blocks and a partial one


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvstrata.cli", "index", *args]


def ns_args() -> list[str]:
    return ["--model", "tiny-llama", "--fingerprint", FINGERPRINT, "--block-size", str(BS)]


@pytest.fixture
def engine() -> Iterator[tuple[VllmLikePublisher, str]]:
    port, replay = free_port(), free_port()
    pub = VllmLikePublisher(f"tcp://127.0.0.1:{port}", bind=True, replay_endpoint=f"tcp://127.0.0.1:{replay}")
    yield pub, f"tcp://127.0.0.1:{port}?instance=gpu-0&replay=tcp://127.0.0.1:{replay}"
    pub.close()


def start(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def query(*args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        cli("query", "--tokens", ",".join(map(str, TOKENS)), *args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def publish_until(pub: VllmLikePublisher, events: list[object], ready: callable[[], bool]) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + 30.0
    sent = False
    while not ready():
        assert time.monotonic() < deadline, "the ingester never saw the events"
        if not sent:
            pub.publish(events)  # replayed on first contact if the subscription was not up yet
            sent = True
        else:
            pub.publish([])
        time.sleep(0.05)


def lookup(port: int, keys: list[bytes]) -> Any:
    body = {"keys": [k.hex() for k in keys]}
    return httpx.post(f"http://127.0.0.1:{port}/lookup", json=body).json()


def test_run_memory_backend_and_query_over_http(engine: tuple[VllmLikePublisher, str]) -> None:
    pub, endpoint = engine
    http_port = free_port()
    proc = start(
        cli("run", "--endpoint", endpoint, "--backend", "memory", "--http-port", str(http_port), *ns_args())
    )
    try:
        wait_for_port(http_port, timeout=30)
        events = stored_events(TOKENS, per_event=4)
        keys = block_keys(NS, TOKENS, BS)

        def ready() -> bool:
            return bool(lookup(http_port, keys)["matches"])

        publish_until(pub, events, ready)
        answer = query("--url", f"http://127.0.0.1:{http_port}", *ns_args())
        assert answer["matches"] == [{"instance": "gpu-0", "blocks": 10, "tiers": {"device": 10}}]
        pub.publish([MapBlockRemoved([hashes_of(events)[4]], "GPU")])
        deadline = time.monotonic() + 10
        while lookup(http_port, keys)["matches"][0]["blocks"] != 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        instances = httpx.get(f"http://127.0.0.1:{http_port}/instances").json()
        assert [i["instance"] for i in instances] == ["gpu-0"]
        bad = httpx.post(f"http://127.0.0.1:{http_port}/lookup", json={"tokens": "nope"})
        assert bad.status_code == 400
    finally:
        stop(proc)


def test_run_redis_backend_and_query_redis(
    engine: tuple[VllmLikePublisher, str], redis_server: RedisServer
) -> None:
    pub, endpoint = engine
    proc = start(cli("run", "--endpoint", endpoint, "--backend", redis_server.url, *ns_args()))
    try:
        events = stored_events(TOKENS, per_event=5, medium="CPU")

        index = open_index(redis_server.url, namespace=NS.id.hex())
        keys = block_keys(NS, TOKENS, BS)
        try:
            publish_until(pub, events, lambda: bool(index.lookup(keys).matches))
        finally:
            index.close()
        answer = query("--backend", redis_server.url, *ns_args())
        assert answer["matches"] == [{"instance": "gpu-0", "blocks": 10, "tiers": {"host": 10}}]
        # another namespace (model) sees nothing
        other = query(
            "--backend",
            redis_server.url,
            "--model",
            "other",
            "--fingerprint",
            FINGERPRINT,
            "--block-size",
            str(BS),
        )
        assert other["matches"] == []
    finally:
        stop(proc)
    assert proc.returncode is not None
