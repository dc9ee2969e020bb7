"""A/B of two variants of the tcp data path in the same run: two ``kvstrata serve`` processes (or one, when
only the client differs), one client each, and the plain socket pair, timed in turns round after round.

Run: ``python bench/ab.py --size 256KiB [--checksum/--no-checksum] [B options]``. B differs from A by any of:

- ``--b-env KEY=VALUE`` (repeatable): environment of B's server, e.g. ``KVSTRATA_SERVER_BULK_THREADS=0``;
- ``--b-tree PATH``: B's server runs the ``kvstrata`` package of another checkout (e.g. a ``git worktree``
  of an earlier revision), so a change can be compared with what came before it at the same moment;
- ``--b-client NAME=VALUE`` (repeatable): a module constant of ``kvstrata.transport.tcp`` set while B's
  client runs, e.g. ``PUT_FRAME_BYTES=2097152`` (A's client runs with the value it has).

A and B swap places every other round. One JSON object per direction on stdout (see
``bench/_common.py``): ``value`` is B's median GiB/s, the ceiling A's, so ``ratio`` is B / A by medians,
and ``paired_ratio`` the median over rounds of each round's B / A (the figure to read on a machine whose
speed swings); ``a_vs_socketpair`` and ``b_vs_socketpair`` are the paired medians of each against the
socket pair. Used for the measured figures quoted in the code comments of the tcp path (frame sizes,
bulk threads, reply writes, and the GET_MANY ramp, since dropped as within the noise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench._common import emit, gib_per_s, log
from bench.transport import RawPeer, ServerProcess, _keys, size_name, warm_up

BENCH = "ab"


@contextmanager
def _client_settings(settings: dict[str, int]) -> Any:
    """``kvstrata.transport.tcp`` constants set to ``settings`` for the duration (restored after)."""
    from kvstrata.transport import tcp

    old = {name: getattr(tcp, name) for name in settings}
    for name, value in settings.items():
        setattr(tcp, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(tcp, name, value)


def _server(slot: int, env: dict[str, str], tree: str | None) -> ServerProcess:
    """A server with ``env`` added, run from ``tree`` (its ``kvstrata`` package first on the path)."""
    saved, here = dict(os.environ), os.getcwd()
    os.environ.update(env)
    try:
        if tree:
            os.chdir(tree)  # ``python -m kvstrata.cli`` imports the package of the working directory first
        return ServerProcess(slot * 200, slot)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def main() -> None:
    """Parse the arguments, start the servers, time A, B and the socket pair in turns, print the ratios."""
    from kvstrata.client import Client
    from kvstrata.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", default="256KiB")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--b-env", action="append", default=[])
    parser.add_argument("--b-tree", default=None)
    parser.add_argument("--b-client", action="append", default=[])
    args = parser.parse_args()
    size = parse_size(args.size)
    b_env = _pairs(args.b_env, "--b-env")
    b_client = {k: parse_size(v) for k, v in _pairs(args.b_client, "--b-client").items()}
    slot = max(size, 8 << 20)
    own_server = bool(b_env or args.b_tree)
    log(f"A/B at {size_name(size)}: B = env {b_env} tree {args.b_tree} client {b_client}")
    server_a = _server(slot, {}, None)
    server_b = _server(slot, b_env, args.b_tree) if own_server else server_a
    peer: RawPeer | None = None
    clients: list[Any] = []
    try:
        for server in {id(s): s for s in (server_a, server_b)}.values():
            warm_up(server, 200, slot)
        peer = RawPeer()
        a = Client(f"kvs://127.0.0.1:{server_a.port}", timeout=60, checksum=args.checksum)
        b = Client(f"kvs://127.0.0.1:{server_b.port}", timeout=60, checksum=args.checksum)
        clients = [a, b]
        keys = _keys(args.chunks, b"ab")
        data = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in keys]
        outs = [torch.ones(size, dtype=torch.uint8) for _ in keys]
        a.put_many(keys, data)
        with _client_settings(b_client):
            b.put_many(keys, data)

        def b_side(fn: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                with _client_settings(b_client):
                    return fn()

            return run

        raw = peer
        cases: dict[str, list[Callable[[], object]]] = {
            "put": [
                lambda: raw.put(data),
                lambda: a.put_many(keys, data),
                b_side(lambda: b.put_many(keys, data)),
            ],
            "get": [
                lambda: raw.get(outs),
                lambda: a.get_many(keys, outs),
                b_side(lambda: b.get_many(keys, outs)),
            ],
        }
        for op, fns in cases.items():
            for fn in fns:
                fn()
            rounds = []
            for turn in range(args.rounds):
                # A and B swap places every other round, so that neither always runs right after the other.
                order = [0, 1, 2] if turn % 2 == 0 else [0, 2, 1]
                times = [0.0, 0.0, 0.0]
                for i in order:
                    start = time.perf_counter()
                    fns[i]()
                    times[i] = time.perf_counter() - start
                rounds.append(times)
            total = size * args.chunks
            med = [statistics.median(r[i] for r in rounds) for i in range(3)]
            suffix = "" if args.checksum else "_nocrc"
            emit(
                BENCH, f"{op}_{size_name(size)}{suffix}", gib_per_s(total, med[2]), "GiB/s",
                gib_per_s(total, med[1]),
                paired_ratio=round(statistics.median(r[1] / r[2] for r in rounds), 3),
                a_vs_socketpair=round(statistics.median(r[0] / r[1] for r in rounds), 3),
                b_vs_socketpair=round(statistics.median(r[0] / r[2] for r in rounds), 3),
            )  # fmt: skip
    finally:
        for client in clients:
            client.close()
        if peer is not None:
            peer.close()
        server_a.close()
        if server_b is not server_a:
            server_b.close()


if __name__ == "__main__":
    main()
