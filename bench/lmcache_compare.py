"""Side by side with LMCache: the same chunks through its ``lmcache_server`` and through ``kvstrata serve``.

Both systems run on this machine in the same run, on loopback, with one client each: 64 chunks of 256 KiB
and of 2 MiB are put, then got back (best of several repeats; the two systems take turns ``--rounds``
times). LMCache is driven through its ``RemoteBackend`` (the path its vLLM integration uses for an
``lm://`` remote server) by ``bench/_lmcache_driver.py``, run by the Python interpreter of a separate
virtualenv where LMCache is installed (kvstrata never imports LMCache)::

    python3 -m venv /path/lmcache-venv
    /path/lmcache-venv/bin/pip install torch==2.13.0 && /path/lmcache-venv/bin/pip install lmcache==0.5.6
    python bench/lmcache_compare.py --lmcache-python /path/lmcache-venv/bin/python

(or set ``LMCACHE_PYTHON``). Without it the script says so and exits 0. Every process of both systems
runs with ``OMP_NUM_THREADS`` torch threads (default 1; set the variable to change it).

Output: JSON lines, one per system, chunk size and direction (``value`` in GiB/s); the kvstrata lines carry
LMCache's figure as their ceiling, so their ``ratio`` is kvstrata / LMCache (goals: >= 2 at 256 KiB, >= 1.2
at 2 MiB). kvstrata runs with payload checksums (its default) and, as ``..._nocrc``, without; LMCache has
none. LMCache's put is asynchronous: its time ends with an EXIST round trip after the last put, which the
server answers only once every put before it on that connection has been stored.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import GIB, emit, log  # noqa: E402

BENCH = "lmcache_compare"
#: torch intra-op threads of every process of both systems (servers and clients alike): on a small machine
#: four processes each spinning OpenMP threads around their copies slow everyone down.
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
SIZES = (256 * 1024, 2 * 1024**2)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_lmcache(python: str, chunks: int, repeat: int) -> dict[int, dict[str, float]]:
    """Start ``lmcache_server HOST PORT cpu`` and drive it; chunk size -> {put_s, get_s}."""
    server_bin = str(Path(python).with_name("lmcache_server"))
    if not os.path.exists(server_bin):
        raise SystemExit(f"{server_bin} not found: is lmcache installed in that virtualenv?")
    env = dict(os.environ, LMCACHE_TRACK_USAGE="false", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=THREADS)
    port = _free_port()
    server = subprocess.Popen(
        [server_bin, "127.0.0.1", str(port), "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, server)
        driver = subprocess.run(
            [
                python,
                str(ROOT / "bench" / "_lmcache_driver.py"),
                "127.0.0.1",
                str(port),
                "--sizes",
                ",".join(str(s) for s in SIZES),
                "--chunks",
                str(chunks),
                "--repeat",
                str(repeat),
            ],
            env=env,
            capture_output=True,
            timeout=600,
            check=False,
        )
    finally:
        _stop(server)
    if driver.returncode != 0:
        tail = driver.stderr.decode(errors="replace")[-3000:]
        raise SystemExit(f"the LMCache driver failed ({driver.returncode}):\n{tail}")
    results: dict[int, dict[str, float]] = {}
    for line in driver.stdout.decode().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if not record.get("verified"):
                raise SystemExit(f"LMCache returned wrong bytes at {record['chunk_bytes']} bytes")
            results[int(record["chunk_bytes"])] = record
    return results


def _kvstrata_rounds(client: Any, size: int, chunks: int, repeat: int) -> tuple[float, float]:
    """Best put_many and get_many times of ``chunks`` chunks of ``size`` bytes (bytes checked once)."""
    import torch

    keys = [os.urandom(16) for _ in range(chunks)]
    datas = [torch.full((size,), i % 251, dtype=torch.uint8) for i in range(chunks)]
    outs = [torch.empty(size, dtype=torch.uint8) for _ in range(chunks)]
    client.put_many(keys, datas)
    got = client.get_many(keys, outs=outs)
    verified = all(
        g is not None and int(o[0]) == i % 251 and int(o[-1]) == i % 251
        for i, (g, o) in enumerate(zip(got, outs, strict=True))
    )
    if not verified:
        raise SystemExit(f"kvstrata returned wrong bytes or misses at {size} bytes")
    put_times, get_times = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        client.put_many(keys, datas)
        put_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.get_many(keys, outs=outs)
        get_times.append(time.perf_counter() - start)
    return min(put_times), min(get_times)


def run_kvstrata(chunks: int, repeat: int) -> dict[int, dict[str, float]]:
    """Start ``kvstrata serve`` (host tier only) and move the same chunks with one Client, with payload
    checksums (the default) and without (``_nocrc``)."""
    import torch

    from kvstrata.client import Client

    torch.set_num_threads(int(THREADS))

    port, admin = _free_port(), _free_port()
    workdir = tempfile.mkdtemp(prefix="kvstrata-bench-")
    host_cache = max(SIZES) * chunks * 2 + 64 * 1024**2
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstrata.cli",
            "serve",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--host-cache",
            str(host_cache),
            "--disk-cache",
            "0",
            "--disk-dir",
            workdir,
        ],
        env=dict(
            os.environ,
            KVSTRATA_STORE_SLOT_BYTES=str(max(SIZES)),
            KVSTRATA_SERVER_TRANSPORTS="tcp",
            OMP_NUM_THREADS=THREADS,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[int, dict[str, float]] = {}
    try:
        _wait_port(port, server)
        for checksum in (True, False):
            suffix = "" if checksum else "_nocrc"
            with Client(f"kvs://127.0.0.1:{port}", checksum=checksum) as client:
                for size in SIZES:
                    put_s, get_s = _kvstrata_rounds(client, size, chunks, repeat)
                    results.setdefault(size, {}).update({f"put{suffix}_s": put_s, f"get{suffix}_s": get_s})
    finally:
        _stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _keep_best(best: dict[int, dict[str, float]], new: dict[int, dict[str, float]]) -> None:
    """Merge ``new`` timings into ``best``, keeping the shortest time of each measurement."""
    for size, times in new.items():
        into = best.setdefault(size, {})
        for name, value in times.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name.endswith("_s"):
                into[name] = min(into.get(name, value), value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmcache-python", default=os.environ.get("LMCACHE_PYTHON", ""))
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lmcache-only", action="store_true", help="measure LMCache alone")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the two systems this many times; best of each"
    )
    args = parser.parse_args()
    python = args.lmcache_python
    if not python or not os.path.exists(python):
        print(
            "lmcache_compare: no LMCache interpreter given (pass --lmcache-python PATH or set LMCACHE_PYTHON "
            "to the python of a virtualenv with lmcache installed); nothing measured.",
            file=sys.stderr,
        )
        return
    theirs: dict[int, dict[str, float]] = {}
    ours: dict[int, dict[str, float]] = {}
    # The systems take turns, so that on a shared machine both see the same spread of load.
    for turn in range(max(1, args.rounds)):
        log(f"lmcache_compare: round {turn + 1}: LMCache RemoteBackend -> lmcache_server ...")
        _keep_best(theirs, run_lmcache(python, args.chunks, args.repeat))
        if not args.lmcache_only:
            log(f"lmcache_compare: round {turn + 1}: kvstrata Client -> kvstrata serve ...")
            _keep_best(ours, run_kvstrata(args.chunks, args.repeat))
    for size in SIZES:
        total = size * args.chunks
        label = f"{size // 1024}KiB" if size < 1024**2 else f"{size // 1024**2}MiB"
        for direction in ("put", "get"):
            their_rate = total / theirs[size][f"{direction}_s"] / GIB
            emit(BENCH, f"lmcache_{direction}_{label}", their_rate, "GiB/s")
            for suffix in ("", "_nocrc"):
                if f"{direction}{suffix}_s" in ours.get(size, {}):
                    our_rate = total / ours[size][f"{direction}{suffix}_s"] / GIB
                    emit(
                        BENCH, f"kvstrata_{direction}_{label}{suffix}", our_rate, "GiB/s", ceiling=their_rate
                    )


if __name__ == "__main__":
    main()
