"""Benchmarks of the transports: one client moving 64 chunks to and from a real ``kvstrata serve``
process, against a plain socket pair (two processes, ``sendall`` / ``recv_into``) moving the same bytes in
the same run.

Run: ``python bench/transport.py [--sizes 256KiB,2MiB,8MiB] [--chunks 64] [--transports tcp]``.
One JSON object per line on stdout (see ``bench/_common.py``).

Cases per transport (a function ``bench_<name>(ctx)`` registered in ``TRANSPORTS``; another transport is
added by writing one such function):

- ``<name>_put_<size>`` / ``<name>_get_<size>``: GiB/s of ``put_many`` / ``get_many`` (into preallocated
  tensors) of 64 chunks, ceiling = the plain socket pair in the same direction, timed in turns with it
  (``ratio``: best round of each; ``paired_ratio``: median of the rounds' ratios; goals: ratio >= 0.9 at
  2-8 MiB, >= 0.8 at 256 KiB). With payload checksums on (the default) and, as ``..._nocrc``, off.
- ``<name>_lookup_prefix_64``: latency of LOOKUP_PREFIX over 64 keys (one round trip; goal <= 0.5 ms),
  ceiling = PING round trip on the same connection.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench._common import best_time, emit, gib_per_s, interleaved, log, median_time, paired_ratio
from bench.transport_shm_nixl import SHM_NIXL_CASES

BENCH = "transport"

# The ceiling's peer: a plain Python socket server in its own process. Command: op (P: receive, G: send),
# chunk size (u64), count (u32). It keeps `count` distinct buffers, like a pool.
_RAW_PEER = r"""
import socket, struct, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
pool = {}
def recv_exact(view):
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            sys.exit(0)
        got += n
head = bytearray(13)
while True:
    try:
        recv_exact(memoryview(head))
    except OSError:
        break
    op, size, count = struct.unpack("<cQI", head)
    bufs = pool.get((size, count))
    if bufs is None:
        bufs = pool[(size, count)] = [bytearray(b"\x01" * size) for _ in range(count)]
    if op == b"P":
        for b in bufs:
            recv_exact(memoryview(b))
        conn.sendall(b"k")
    elif op == b"G":
        for b in bufs:
            conn.sendall(b)
    else:
        break
"""


class RawPeer:
    """The plain socket pair: this process and a peer process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _RAW_PEER], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def put(self, chunks: list[torch.Tensor]) -> None:
        size = chunks[0].numel()
        self.sock.sendall(struct.pack("<cQI", b"P", size, len(chunks)))
        for chunk in chunks:
            self.sock.sendall(memoryview(chunk.numpy()))
        assert self.sock.recv(1) == b"k"

    def get(self, outs: list[torch.Tensor]) -> None:
        size = outs[0].numel()
        self.sock.sendall(struct.pack("<cQI", b"G", size, len(outs)))
        for out in outs:
            view = memoryview(out.numpy())
            got = 0
            while got < size:
                got += self.sock.recv_into(view[got:])

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


class ServerProcess:
    """A ``kvstrata serve`` process sized for the run."""

    def __init__(self, host_cache: int, slot: int, transports: str = "tcp") -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="kvstrata-bench-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "KVSTRATA_SERVER_TRANSPORTS": transports, "KVSTRATA_LOG_LEVEL": "info"}
        args = [
            sys.executable, "-m", "kvstrata.cli", "serve", "--port", "0", "--admin-port", "0",
            "--host-cache", str(host_cache), "--slot-size", str(slot), "--disk-cache", "0",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        pattern = re.compile(r"data port listening on kvs://[^:]+:(\d+)")
        while time.monotonic() < deadline:
            match = pattern.search(Path(self.log.name).read_text())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("kvstrata serve did not start:\n" + Path(self.log.name).read_text())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        os.unlink(self.log.name)


@dataclass
class BenchContext:
    """What every transport case gets: the server, the chunk sizes and count, the ceilings measured."""

    server: ServerProcess
    sizes: list[int]
    chunks: int
    repeat: int
    #: (direction, size) -> plain socket pair GiB/s, measured in this run
    ceilings: dict[tuple[str, int], float] = field(default_factory=dict)
    #: the plain socket pair's peer process, for ceilings timed in turns with a transport
    peer: RawPeer = field(default_factory=lambda: RawPeer())


def size_name(size: int) -> str:
    """256KiB, 2MiB..."""
    return f"{size // (1 << 20)}MiB" if size >= 1 << 20 else f"{size // 1024}KiB"


def measure_ceilings(ctx: BenchContext) -> None:
    """The plain socket pair, both directions, every size (the peer stays up for interleaved timing)."""
    peer = ctx.peer
    for size in ctx.sizes:
        chunks = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(ctx.chunks)]
        outs = [torch.ones(size, dtype=torch.uint8) for _ in range(ctx.chunks)]
        total = size * ctx.chunks
        put = gib_per_s(total, best_time(lambda c=chunks: peer.put(c), repeat=ctx.repeat))
        get = gib_per_s(total, best_time(lambda o=outs: peer.get(o), repeat=ctx.repeat))
        ctx.ceilings[("put", size)] = put
        ctx.ceilings[("get", size)] = get
        emit(BENCH, f"socketpair_put_{size_name(size)}", put, "GiB/s")
        emit(BENCH, f"socketpair_get_{size_name(size)}", get, "GiB/s")


def _keys(n: int, salt: bytes) -> list[bytes]:
    import hashlib

    return [hashlib.blake2b(salt + i.to_bytes(4, "little"), digest_size=16).digest() for i in range(n)]


def warm_up(server: ServerProcess, slots: int, slot: int) -> None:
    """Fill every slot of the server's host pool once, so timed runs see committed pages (steady state)."""
    from kvstrata.client import Client

    with Client(f"kvs://127.0.0.1:{server.port}", timeout=120) as client:
        keys = _keys(slots, b"warm-up")
        data = torch.ones(slot, dtype=torch.uint8)
        for start in range(0, slots, 16):
            part = keys[start : start + 16]
            client.put_many(part, [data] * len(part))
        client.delete(keys)


def bench_client(ctx: BenchContext, name: str, url: str, **client_kwargs: object) -> None:
    """put_many / get_many / lookup through a Client on ``url``: the body of every transport's case."""
    from kvstrata.client import Client

    for checksum in (True, False):
        suffix = "" if checksum else "_nocrc"
        with Client(url, timeout=60, checksum=checksum, **client_kwargs) as client:  # type: ignore[arg-type]
            for size in ctx.sizes:
                keys = _keys(ctx.chunks, f"{name}{size}{checksum}".encode())
                data = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in keys]
                outs = [torch.ones(size, dtype=torch.uint8) for _ in keys]
                total = size * ctx.chunks
                got: list[torch.Tensor | None] = []

                def get(
                    k: list[bytes] = keys, o: list[torch.Tensor] = outs, g: list[torch.Tensor | None] = got
                ) -> None:
                    g[:] = client.get_many(k, o)

                def put(k: list[bytes] = keys, d: list[torch.Tensor] = data) -> None:
                    client.put_many(k, d)

                # The ceiling is timed in turns with the transport, so both see the same machine load.
                puts = interleaved(ctx.repeat, lambda d=data: ctx.peer.put(d), put)
                gets = interleaved(ctx.repeat, lambda o=outs: ctx.peer.get(o), get)
                ceiling_put = gib_per_s(total, min(r[0] for r in puts))
                ceiling_get = gib_per_s(total, min(r[0] for r in gets))
                put_rate = gib_per_s(total, min(r[1] for r in puts))
                rate = gib_per_s(total, min(r[1] for r in gets))
                if any(g is None or not torch.equal(g, d) for g, d in zip(got, data, strict=True)):
                    raise RuntimeError(f"{name}: wrong bytes came back at {size_name(size)}")
                label = size_name(size)
                emit(
                    BENCH, f"{name}_put_{label}{suffix}", put_rate, "GiB/s", ceiling_put,
                    paired_ratio=round(paired_ratio(puts, 0, 1), 3),
                )  # fmt: skip
                emit(
                    BENCH, f"{name}_get_{label}{suffix}", rate, "GiB/s", ceiling_get,
                    paired_ratio=round(paired_ratio(gets, 0, 1), 3),
                )  # fmt: skip
            if checksum:
                keys = _keys(64, f"{name}lookup".encode())
                client.put_many(keys, [torch.zeros(1024, dtype=torch.uint8) for _ in keys])
                lookup = median_time(lambda k=keys: client.lookup_prefix(k), repeat=200, warmup=20)
                ping = median_time(client.ping, repeat=200, warmup=20)
                emit(BENCH, f"{name}_lookup_prefix_64", lookup * 1e3, "ms", ping * 1e3, goal_ms=0.5)


def bench_tcp(ctx: BenchContext) -> None:
    """The tcp transport (``kvs://``)."""
    bench_client(ctx, "tcp", f"kvs://127.0.0.1:{ctx.server.port}")


#: transport name -> its case function; shm and nixl add theirs here.
TRANSPORTS: dict[str, Callable[[BenchContext], None]] = {"tcp": bench_tcp}
TRANSPORTS.update(SHM_NIXL_CASES)


def main() -> None:
    """Parse the arguments, start the server, measure the ceilings, run each transport's cases."""
    from kvstrata.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="256KiB,2MiB,8MiB")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    names = [n for n in args.transports.split(",") if n]
    slot = max(sizes)
    # Room for one run's chunks twice over (a put that replaces a key takes a new slot before the old
    # one is freed), plus the lookup keys; warm_up() commits every slot's pages before timing.
    host_cache = slot * (2 * args.chunks + 96)
    log(f"starting kvstrata serve (host cache {host_cache >> 20} MiB, slot {slot >> 20} MiB)")
    server = ServerProcess(host_cache, slot, transports=",".join(["tcp", *[n for n in names if n != "tcp"]]))
    try:
        ctx = BenchContext(server, sizes, args.chunks, args.repeat)
        try:
            warm_up(server, host_cache // slot, slot)
            measure_ceilings(ctx)
            for name in names:
                log(f"transport {name}")
                TRANSPORTS[name](ctx)
        finally:
            ctx.peer.close()
    finally:
        server.close()


if __name__ == "__main__":
    main()
