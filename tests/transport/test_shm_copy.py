"""The shm client's host copies: one batch of memmoves shared by the calling thread and helper threads."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest
import torch

from kvstrata.transport.shm import HostCopier


def _pieces(src: torch.Tensor, dst: torch.Tensor, sizes: list[int]) -> list[tuple[int, int, int]]:
    """Pieces copying consecutive runs of ``src`` into ``dst`` in reverse order (so a misplaced or missed
    piece shows as wrong bytes)."""
    pieces, offset, end = [], 0, dst.numel()
    for n in sizes:
        end -= n
        pieces.append((dst.data_ptr() + end, src.data_ptr() + offset, n))
        offset += n
    return pieces


def _reference(src: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out, offset = [], 0
    for n in sizes:
        out.append(src[offset : offset + n])
        offset += n
    return torch.cat(list(reversed(out)))


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_every_piece_lands_where_it_belongs(helpers: int) -> None:
    gen = torch.Generator().manual_seed(helpers)
    sizes = [int(s) for s in torch.randint(1, 300_000, (200,), generator=gen)]
    src = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=gen)
    dst = torch.zeros_like(src)
    HostCopier(helpers).copy(_pieces(src, dst, sizes))
    assert torch.equal(dst, _reference(src, sizes))


def test_batches_of_several_threads_at_once_are_all_copied() -> None:
    copier = HostCopier(2)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(20):
                sizes = [int(s) for s in torch.randint(1, 1 << 20, (16,), generator=gen)]
                src = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=gen)
                dst = torch.zeros_like(src)
                copier.copy(_pieces(src, dst, sizes))
                assert torch.equal(dst, _reference(src, sizes)), f"thread {seed}: wrong bytes"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_helpers() -> None:
    # Plain buffers only: torch in a child forked after it ran its own threads may hang.
    n = 4 << 20
    src = bytearray(os.urandom(n))
    dst = bytearray(n)
    src_at = ctypes.addressof((ctypes.c_char * n).from_buffer(src))
    dst_at = ctypes.addressof((ctypes.c_char * n).from_buffer(dst))
    step = 1 << 20
    pieces = [(dst_at + i, src_at + i, step) for i in range(0, n, step)]
    copier = HostCopier(1)
    copier.copy(pieces)  # helpers started in this process
    assert dst == src
    pid = os.fork()
    if pid == 0:  # the child: the parent's helper threads do not exist here
        code = 1
        try:
            ctypes.memset(dst_at, 0, n)
            copier.copy(pieces)
            helpers = [t for t in threading.enumerate() if t.name.startswith("kvstrata-shm-copy")]
            code = 0 if dst == src and len(helpers) == 1 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish its copy")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
