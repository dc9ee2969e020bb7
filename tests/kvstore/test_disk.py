"""DiskTier beyond the shared contract: restart recovery, crash safety, corruption, full disks, format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kvstrata.kvstore.disk as disk
import kvstrata.kvstore.diskformat as diskformat
from kvstrata.core.chunk import ChunkMeta
from kvstrata.errors import ChunkTooLargeError, StoreError, TierFullError
from kvstrata.kvstore.disk import DiskTier
from kvstrata.kvstore.diskformat import HEADER_ALIGN, MAGIC, decode_header, encode_header
from kvstrata.kvstore.tier import TierEvent
from tests.conftest import require
from tests.kvstore.conformance_tier import check_stamped, chunk_key, meta_for, pattern, stamped

REPO = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024


@pytest.fixture
def tier_dir(tmp_path: Path) -> Path:
    return tmp_path / "disk"


def fill(tier: DiskTier, n: int, nbytes: int = CHUNK, salt: bytes = b"") -> list[bytes]:
    keys = [chunk_key(i, salt) for i in range(n)]
    for key in keys:
        tier.put(key, pattern(key, nbytes), meta_for(key, 3))
    return keys


def child_env() -> dict[str, str]:
    """The environment of a child Python: this repository first, then whatever this process sees."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def chunk_files(directory: Path) -> list[Path]:
    return list(directory.rglob("*.kvc"))


# -- restart recovery --------------------------------------------------------------------------------
def test_restart_recovers_the_catalog(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 64 * CHUNK)
    keys = fill(tier, 5)
    meta = ChunkMeta(block_keys=(keys[0],), fingerprint=b"\xab" * 16, codec="fp8", num_tokens=256)
    tier.put(keys[0], pattern(keys[0], CHUNK // 2, 1), meta)
    used = tier.used_bytes
    tier.close()

    again = DiskTier(tier_dir, 64 * CHUNK)
    try:
        assert again.recovery.chunks == 5 and again.recovery.corrupt_dropped == 0
        assert sorted(again.keys()) == sorted(keys)
        assert again.used_bytes == used
        assert again.get_meta(keys[0]) == meta
        assert again.get_meta(keys[1]) == meta_for(keys[1], 3)
        got = again.get(keys[0])
        assert got is not None and torch.equal(got, pattern(keys[0], CHUNK // 2, 1))
        for key in keys[1:]:
            got = again.get(key)
            assert got is not None and torch.equal(got, pattern(key, CHUNK))
    finally:
        again.close()


def test_restart_with_a_smaller_capacity_evicts_the_oldest(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 64 * CHUNK)
    keys = []
    for i in range(4):
        keys += fill(tier, 1, salt=bytes([i]))
        # Recovery orders by modification time; make it unambiguous on coarse-grained clocks.
        path = tier.path_of(keys[-1])
        assert path is not None
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    tier.close()
    small = DiskTier(tier_dir, 2 * (CHUNK + HEADER_ALIGN))
    try:
        assert small.recovery.evicted == 2
        assert sorted(small.keys()) == sorted(keys[2:])
        assert small.used_bytes <= small.capacity_bytes
        assert len(chunk_files(tier_dir)) == 2
    finally:
        small.close()


def test_one_tier_per_directory(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    with pytest.raises(StoreError):
        DiskTier(tier_dir, 16 * CHUNK)
    tier.close()
    DiskTier(tier_dir, 16 * CHUNK).close()


def test_startup_drops_temporary_and_foreign_chunk_files(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 2)
    path = tier.path_of(keys[0])
    assert path is not None
    tier.close()
    (path.parent / f".{keys[0].hex()}.999.1.tmp").write_bytes(b"half a chunk")
    # A complete, valid file stored under another key's name is not served under that name.
    os.rename(path, path.parent / (chunk_key(77).hex() + ".kvc"))
    again = DiskTier(tier_dir, 16 * CHUNK)
    try:
        assert again.recovery.partial_dropped == 1
        assert again.recovery.corrupt_dropped == 1
        assert again.stats.errors == 1
        assert sorted(again.keys()) == [keys[1]]
        assert temp_files(tier_dir) == []
    finally:
        again.close()


def test_catalog_matches_the_directory_after_concurrent_use(tier_dir: Path) -> None:
    """Writers replacing the same keys, readers, removers and eviction at once: no torn read, and after
    it the catalog, the files and the byte count agree exactly."""
    import random
    import threading

    tier = DiskTier(tier_dir, 6 * (CHUNK + HEADER_ALIGN))
    keys = [chunk_key(i, b"hammer") for i in range(8)]
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for step in range(120):
                key = rng.choice(keys)
                roll = rng.random()
                if roll < 0.45:
                    try:
                        tier.put(key, stamped(key, CHUNK, seed * 1000 + step))
                    except TierFullError:
                        pass  # the other threads pinned everything evictable
                elif roll < 0.8:
                    got = tier.get(key)
                    if got is not None:
                        check_stamped(key, got)
                elif roll < 0.9:
                    handle = tier.acquire(key)
                    if handle is not None:
                        with handle:
                            check_stamped(key, handle.data)
                else:
                    tier.remove(key)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if failures:
        raise failures[0]
    files = chunk_files(tier_dir)
    assert temp_files(tier_dir) == []
    assert sorted(bytes.fromhex(p.name[:32]) for p in files) == sorted(tier.keys())
    assert tier.used_bytes == sum(p.stat().st_size for p in files) <= tier.capacity_bytes
    assert tier.stats.errors == 0
    tier.close()
    again = DiskTier(tier_dir, 6 * (CHUNK + HEADER_ALIGN))
    try:
        assert again.recovery.corrupt_dropped == 0 and again.recovery.partial_dropped == 0
        assert len(again) == len(files)
        stored = again.keys()
        for key in stored:
            got = again.get(key)
            assert got is not None
            check_stamped(key, got)
    finally:
        again.close()


# -- corruption --------------------------------------------------------------------------------------
def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_payload_byte_is_a_counted_miss(tier_dir: Path, where: str) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    events: list[TierEvent] = []
    tier.subscribe(events.append)
    keys = fill(tier, 2)
    path = tier.path_of(keys[0])
    assert path is not None
    offset = {"first": 0, "middle": CHUNK // 2, "last": CHUNK - 1}[where]
    flip(path, HEADER_ALIGN + offset)
    errors, misses = tier.stats.errors, tier.stats.misses
    out = torch.empty(CHUNK, dtype=torch.uint8)
    assert tier.get(keys[0], out=out) is None
    assert tier.stats.errors == errors + 1 and tier.stats.misses == misses + 1
    assert not tier.contains(keys[0]) and not path.exists(), "the corrupt file is dropped"
    assert events[-1].kind == "removed" and events[-1].keys == (keys[0],)
    assert tier.get(keys[0]) is None
    got = tier.get(keys[1])
    assert got is not None and torch.equal(got, pattern(keys[1], CHUNK)), "other chunks are untouched"
    tier.close()


def test_corruption_is_caught_when_read_in_pieces(tier_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk, "_READ_PIECE", 4096)  # chunks larger than a piece are read piece by piece
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 3)
    got = tier.get(keys[2])
    assert got is not None and torch.equal(got, pattern(keys[2], CHUNK))
    paths = [tier.path_of(k) for k in keys]
    assert paths[0] is not None and paths[1] is not None
    flip(paths[0], HEADER_ALIGN + CHUNK - 4096 - 1)  # the last byte of the second-to-last piece
    os.truncate(paths[1], HEADER_ALIGN + CHUNK - 4096)  # the last piece is missing
    assert tier.get(keys[0]) is None
    assert tier.get(keys[1]) is None
    assert tier.stats.errors == 2 and len(tier) == 1
    tier.close()


def test_corrupt_chunk_through_acquire_is_a_miss(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 1)
    path = tier.path_of(keys[0])
    assert path is not None
    flip(path, HEADER_ALIGN + 10)
    assert tier.acquire(keys[0]) is None
    assert tier.stats.errors == 1 and not tier.contains(keys[0])
    assert tier.used_bytes == 0
    tier.close()


def test_truncated_file_is_a_counted_miss(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 1)
    path = tier.path_of(keys[0])
    assert path is not None
    os.truncate(path, HEADER_ALIGN + CHUNK // 2)
    assert tier.get(keys[0]) is None
    assert tier.stats.errors == 1 and not path.exists()
    tier.close()


def test_file_deleted_behind_the_tier_is_a_counted_miss(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 1)
    path = tier.path_of(keys[0])
    assert path is not None
    path.unlink()
    assert tier.get(keys[0]) is None
    assert tier.stats.errors == 1 and not tier.contains(keys[0]) and tier.used_bytes == 0
    tier.close()


@pytest.mark.parametrize("damage", ["truncate-payload", "truncate-header", "flip-header", "extend", "magic"])
def test_damaged_files_are_dropped_at_startup(tier_dir: Path, damage: str) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 3)
    path = tier.path_of(keys[1])
    assert path is not None
    tier.close()
    if damage == "truncate-payload":
        os.truncate(path, HEADER_ALIGN + CHUNK - 1)
    elif damage == "truncate-header":
        os.truncate(path, 100)
    elif damage == "flip-header":
        flip(path, 72)  # inside the payload checksum field: only the header checksum can tell
    elif damage == "extend":
        with open(path, "ab") as f:
            f.write(b"\x00")
    else:
        with open(path, "r+b") as f:
            f.write(b"NOTCHUNK")
    again = DiskTier(tier_dir, 16 * CHUNK)
    try:
        assert again.recovery.corrupt_dropped == 1
        assert again.stats.errors == 1
        assert not path.exists()
        assert sorted(again.keys()) == sorted([keys[0], keys[2]])
        for key in (keys[0], keys[2]):
            got = again.get(key)
            assert got is not None and torch.equal(got, pattern(key, CHUNK))
    finally:
        again.close()


def test_payload_damage_survives_startup_but_is_caught_on_read(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 1)
    path = tier.path_of(keys[0])
    assert path is not None
    tier.close()
    flip(path, HEADER_ALIGN + 123)
    again = DiskTier(tier_dir, 16 * CHUNK)
    try:
        assert again.contains(keys[0]), "payloads are not read at start-up"
        assert again.get(keys[0]) is None
        assert again.stats.errors == 1 and not path.exists()
    finally:
        again.close()


# -- the format --------------------------------------------------------------------------------------
def test_header_round_trip_and_bounds() -> None:
    key = chunk_key(1)
    meta = meta_for(key, 16)
    header = encode_header(key, meta, 12345, 0xDEADBEEF, diskformat.CHECKSUM_CRC32)
    assert len(header) == HEADER_ALIGN and header[:8] == MAGIC
    decoded = decode_header(lambda off, n: header[off : off + n])
    assert (decoded.key, decoded.meta, decoded.payload_len, decoded.payload_sum) == (
        key,
        meta,
        12345,
        0xDEADBEEF,
    )
    many = ChunkMeta(block_keys=tuple(chunk_key(i) for i in range(300)))
    assert len(encode_header(key, many, 0, 0, diskformat.CHECKSUM_CRC32)) == 2 * HEADER_ALIGN
    future = bytearray(header)
    future[8] = 2  # format version 2
    with pytest.raises(ValueError, match="version"):
        decode_header(lambda off, n: bytes(future[off : off + n]))


VECTOR_HEAD = bytes.fromhex(
    "4b56534348554e4b0100011000100000"
    "000102030405060708090a0b0c0d0e0f"
    "11111111111111111111111111111111"
    "696e7438000000000000000000000000"
    "0004000000000000264c0bb700000000"
    "2000000002000000de51c26700000000" + "00" * 32 + "aa" * 16 + "000102030405060708090a0b0c0d0e0f"
)


def test_header_test_vector_of_the_spec() -> None:
    key = bytes(range(16))
    payload = bytes(range(256)) * 4
    meta = ChunkMeta(block_keys=(b"\xaa" * 16, key), fingerprint=b"\x11" * 16, codec="int8", num_tokens=32)
    crc = diskformat.checksum(diskformat.CHECKSUM_CRC32, payload)
    assert crc == 0xB70B4C26
    header = encode_header(key, meta, len(payload), crc, diskformat.CHECKSUM_CRC32)
    assert header[:160] == VECTOR_HEAD and header[160:] == bytes(HEADER_ALIGN - 160)
    if diskformat.CHECKSUM_XXH3 in diskformat.available_checksums():
        xxh = diskformat.checksum(diskformat.CHECKSUM_XXH3, payload)
        assert xxh == 0xA870F92984398D22
        header = encode_header(key, meta, len(payload), xxh, diskformat.CHECKSUM_XXH3)
        assert header[88:96] == (0xCD22069B577B836D).to_bytes(8, "little")


def test_crc32_files_are_read_by_any_build(tier_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskformat, "_xxhash", None)  # a build without the optional xxhash package
    tier = DiskTier(tier_dir, 16 * CHUNK)
    keys = fill(tier, 2)
    path = tier.path_of(keys[0])
    assert path is not None
    flip(path, HEADER_ALIGN + 5)
    assert tier.get(keys[0]) is None, "CRC-32 catches the flip too"
    tier.close()
    monkeypatch.undo()
    again = DiskTier(tier_dir, 16 * CHUNK)
    try:
        got = again.get(keys[1])
        assert got is not None and torch.equal(got, pattern(keys[1], CHUNK))
    finally:
        again.close()


def test_files_whose_checksum_this_build_lacks_are_dropped(
    tier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if diskformat.default_checksum() != diskformat.CHECKSUM_XXH3:
        pytest.skip("this build writes CRC-32 files, which every build reads")
    tier = DiskTier(tier_dir, 16 * CHUNK)
    fill(tier, 2)
    tier.close()
    monkeypatch.setattr(diskformat, "_xxhash", None)  # a build without the optional xxhash package
    again = DiskTier(tier_dir, 16 * CHUNK)
    try:
        # It cannot verify them, so it cannot serve them; deleting them keeps the size bound honest.
        assert again.recovery.corrupt_dropped == 2 and len(again) == 0
        assert chunk_files(tier_dir) == []
    finally:
        again.close()


# -- crash safety: a real writer process killed with SIGKILL mid-write --------------------------------
WRITER = """
import sys
from kvstrata.kvstore.disk import DiskTier
from tests.kvstore.conformance_tier import stamped
tier = DiskTier(sys.argv[1], 1 << 30)
size, i = int(sys.argv[2]), 0
while True:
    key = bytes([0]) + i.to_bytes(15, "little")   # every chunk in subdirectory 00: easy to watch
    tier.put(key, stamped(key, size, i))
    print(key.hex(), flush=True)                  # printed only after the rename: committed
    i += 1
"""


def _kill_mid_write(directory: Path, size: int) -> tuple[list[bytes], bool]:
    """Run a writer, SIGKILL it while a temporary file exists; (committed keys, killed mid-write)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(size)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    assert proc.stdout is not None
    committed: list[bytes] = []
    try:
        committed.append(bytes.fromhex(proc.stdout.readline().decode().strip()))  # it is up and writing
        sub = directory / "00"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(name.endswith(".tmp") for name in os.listdir(sub)):
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=20)
    with proc.stdout:
        committed += [bytes.fromhex(line.decode().strip()) for line in proc.stdout if line.strip()]
    return committed, bool(temp_files(directory))


def test_writer_killed_mid_write_leaves_no_partial_chunk(tier_dir: Path) -> None:
    size = 8 * 1024 * 1024
    all_committed: set[bytes] = set()
    mid_write = False
    attempts = 0
    while attempts < 3 and not mid_write:  # the kill lands mid-write almost always; retry the rare miss
        attempts += 1
        committed, mid_write = _kill_mid_write(tier_dir, size)
        all_committed |= set(committed)
    assert mid_write, "the writer was never caught mid-write"
    tier = DiskTier(tier_dir, 1 << 30)
    try:
        assert tier.recovery.partial_dropped >= 1
        assert temp_files(tier_dir) == []
        keys = set(tier.keys())
        assert all_committed <= keys, "every chunk whose put returned survives"
        # A chunk renamed just before the kill, before its key was printed, may be there too (whole).
        assert len(keys - all_committed) <= attempts
        for key in keys:
            got = tier.get(key)
            assert got is not None and got.numel() == size
            check_stamped(key, got)
        assert tier.stats.errors == 0
    finally:
        tier.close()


# -- a full disk: a real, small file system ------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root, or CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = False
    if os.geteuid() == 0:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True
        )
        mounted = result.returncode == 0
    require(mounted, "a mountable tmpfs (root in a container that allows mount)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_file_system_evicts_or_refuses_and_reads_go_on(small_fs: Path) -> None:
    nbytes = 256 * 1024
    # The tier's own bound (64 MiB) is far above the file system's 2 MiB: the disk fills first.
    tier = DiskTier(small_fs / "tier", 64 * 1024 * 1024)
    events: list[TierEvent] = []
    tier.subscribe(events.append)
    try:
        keys = [chunk_key(i, b"full") for i in range(16)]
        for key in keys:
            tier.put(key, pattern(key, nbytes))  # evict=True: make real room on ENOSPC and retry
            assert tier.contains(key)
        assert tier.stats.evictions > 0 and tier.stats.errors > 0
        assert 1 <= len(tier) < len(keys)
        assert any(e.kind == "removed" for e in events)
        survivors = list(tier.keys())
        assert keys[-1] in survivors
        # Fill it up, then a put that may not evict is refused with TierFullError ...
        extra = [chunk_key(i, b"extra") for i in range(16)]
        refused = None
        for key in extra:
            try:
                tier.put(key, pattern(key, nbytes), evict=False)
            except TierFullError:
                refused = key
                break
        assert refused is not None, "a 2 MiB file system cannot take 16 more 256 KiB chunks"
        assert not tier.contains(refused)
        assert temp_files(small_fs) == [], "a refused put leaves no temporary file"
        # ... and every stored chunk still reads back exactly.
        stored = tier.keys()
        for key in stored:
            nb = tier.size_of(key)
            got = tier.get(key)
            assert got is not None and nb is not None
            assert torch.equal(got, pattern(key, nb))
        assert tier.used_bytes <= tier.capacity_bytes
    finally:
        tier.close()


SIZE_LIMITED = """
import json, resource, signal, sys, os
from kvstrata.errors import ChunkTooLargeError
from kvstrata.kvstore.disk import DiskTier
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # get EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
tier = DiskTier(sys.argv[1], 64 << 20)
small, big = bytes([0]) * 16, bytes([1]) * 16
tier.put(small, bytes(range(256)) * 1024)              # 256 KiB: fits under the 1 MiB file limit
try:
    tier.put(big, b"x" * (2 << 20))
    outcome = "stored"
except ChunkTooLargeError as exc:
    outcome = "refused"
got = tier.get(small)
print(json.dumps({
    "outcome": outcome,
    "big_present": tier.contains(big),
    "small_ok": got is not None and got.numpy().tobytes() == bytes(range(256)) * 1024,
    "errors": tier.stats.errors,
    "files": sorted(p for _, _, fs in os.walk(sys.argv[1]) for p in fs if p != "LOCK"),
}))
"""


def test_file_size_limit_refuses_the_chunk_and_reads_go_on(tier_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIZE_LIMITED, str(tier_dir)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["outcome"] == "refused"
    assert report["big_present"] is False
    assert report["small_ok"] is True
    assert report["errors"] == 1
    assert report["files"] == [(bytes([0]) * 16).hex() + ".kvc"], "no partial file is left"


def test_chunk_larger_than_the_tier(tier_dir: Path) -> None:
    tier = DiskTier(tier_dir, 2 * CHUNK)
    with pytest.raises(ChunkTooLargeError):
        tier.put(chunk_key(1), torch.zeros(2 * CHUNK, dtype=torch.uint8))  # plus its header: too large
    assert chunk_files(tier_dir) == [] and temp_files(tier_dir) == []
    tier.close()


def test_stamped_helpers_detect_torn_chunks() -> None:
    key = chunk_key(3)
    data = stamped(key, 1024, 7)
    assert check_stamped(key, data) == 7
    data[500] ^= 1
    with pytest.raises(AssertionError):
        check_stamped(key, data)
