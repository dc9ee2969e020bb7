"""The BlockIndex conformance suite: every backend's test module subclasses :class:`IndexConformance`.

A subclass provides the ``index`` fixture (a fresh, empty index whose default lease TTL is long). Writes are
followed by ``flush()`` before lookups, as the contract asks of backends that batch writes.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest

from kvstrata.errors import InvalidArgumentError
from kvstrata.index.base import TIERS, BlockIndex, LookupResult


def make_keys(n: int, salt: str = "") -> list[bytes]:
    """``n`` distinct 16-byte keys, stable for a given salt."""
    return [hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=16).digest() for i in range(n)]


def summary(result: LookupResult) -> dict[str, tuple[int, dict[str, int]]]:
    """A comparable form of a lookup result: instance -> (prefix blocks, tier depths)."""
    return {name: (m.blocks, dict(m.tiers)) for name, m in result.matches.items()}


class ReferenceIndex:
    """A naive model of the contract (a set of (instance, tier, key) with epochs), for randomized checks."""

    def __init__(self) -> None:
        self.held: set[tuple[str, str, bytes]] = set()

    def add(self, instance: str, tier: str, keys: list[bytes]) -> None:
        self.held.update((instance, tier, k) for k in keys)

    def remove(self, instance: str, tier: str, keys: list[bytes]) -> None:
        self.held.difference_update((instance, tier, k) for k in keys)

    def clear(self, instance: str) -> None:
        self.held = {h for h in self.held if h[0] != instance}

    def lookup(self, keys: list[bytes]) -> dict[str, tuple[int, dict[str, int]]]:
        out: dict[str, tuple[int, dict[str, int]]] = {}
        for instance in {h[0] for h in self.held}:
            n = 0
            while n < len(keys) and any((instance, t, keys[n]) in self.held for t in TIERS):
                n += 1
            if not n:
                continue
            depths = {}
            for t in TIERS:
                d = 0
                while d < len(keys) and (instance, t, keys[d]) in self.held:
                    d += 1
                if d:
                    depths[t] = d
            out[instance] = (n, depths)
        return out


class IndexConformance:
    """Behaviour every BlockIndex backend must show."""

    def settle(self, index: BlockIndex) -> None:
        assert index.flush(timeout_s=10.0), "writes did not reach the backend"

    def test_empty_index_matches_nothing(self, index: BlockIndex) -> None:
        keys = make_keys(5)
        result = index.lookup(keys)
        assert result.num_blocks == 5
        assert result.matches == {}
        assert result.best() is None
        assert index.lookup([]).num_blocks == 0

    def test_longest_consecutive_prefix_per_instance(self, index: BlockIndex) -> None:
        keys = make_keys(20)
        index.add("a", "host", keys[:12])
        index.add("b", "host", keys[:5])
        index.add("c", "host", keys[1:20])  # lacks the first block: matches nothing
        self.settle(index)
        result = index.lookup(keys)
        assert summary(result) == {"a": (12, {"host": 12}), "b": (5, {"host": 5})}
        best = result.best()
        assert best is not None and best.instance == "a"

    def test_a_hole_ends_the_prefix(self, index: BlockIndex) -> None:
        keys = make_keys(10)
        index.add("a", "disk", keys[:3] + keys[4:])
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (3, {"disk": 3})}

    def test_depth_per_tier(self, index: BlockIndex) -> None:
        keys = make_keys(10)
        index.add("a", "device", keys[:4])
        index.add("a", "host", keys[:8])
        index.add("a", "disk", keys[6:10])  # a mix: device/host for 0..7, disk for 6..9
        index.add("b", "device", keys[:2])
        index.add("b", "remote", keys[2:6])
        self.settle(index)
        assert summary(index.lookup(keys)) == {
            "a": (10, {"device": 4, "host": 8}),
            "b": (6, {"device": 2}),
        }

    def test_adds_are_idempotent_and_removes_too(self, index: BlockIndex) -> None:
        keys = make_keys(6)
        index.add("a", "host", keys)
        index.add("a", "host", keys)
        index.remove("a", "host", keys[3:4])
        index.remove("a", "host", keys[3:4])
        index.remove("a", "disk", keys)  # a tier it never held
        index.remove("zz", "disk", keys)  # an instance never seen
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (3, {"host": 3})}

    def test_remove_from_one_tier_keeps_the_other(self, index: BlockIndex) -> None:
        keys = make_keys(6)
        index.add("a", "host", keys)
        index.add("a", "disk", keys)
        index.remove("a", "host", keys[2:])
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (6, {"host": 2, "disk": 6})}
        index.remove("a", "disk", keys[:1])
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (6, {"host": 2})}

    def test_clear_forgets_one_instance_only(self, index: BlockIndex) -> None:
        keys = make_keys(8)
        index.add("a", "host", keys)
        index.add("b", "disk", keys[:4])
        self.settle(index)
        epoch = {i.instance: i.epoch for i in index.instances()}["a"]
        index.clear("a")
        self.settle(index)
        assert summary(index.lookup(keys)) == {"b": (4, {"disk": 4})}
        assert {i.instance: i.epoch for i in index.instances()}["a"] > epoch
        # what it stores after the clear counts again, the old entries do not
        index.add("a", "device", keys[:2])
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (2, {"device": 2}), "b": (4, {"disk": 4})}

    def test_many_clears(self, index: BlockIndex) -> None:
        keys = make_keys(4)
        for round_ in range(40):
            index.add("a", "host", keys[: 1 + round_ % 4])
            index.clear("a")
        index.add("a", "host", keys[:3])
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (3, {"host": 3})}

    def test_lease_expiry_hides_an_instance(self, index: BlockIndex) -> None:
        keys = make_keys(4)
        index.add("a", "host", keys)
        index.add("b", "host", keys[:2])
        index.heartbeat("b", ttl_s=0.3)
        self.settle(index)
        assert set(index.lookup(keys).matches) == {"a", "b"}
        deadline = time.monotonic() + 5.0
        while "b" in index.lookup(keys).matches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert summary(index.lookup(keys)) == {"a": (4, {"host": 4})}
        assert [i.instance for i in index.instances()] == ["a"]
        # a heartbeat brings it back, with the entries it still had
        index.heartbeat("b")
        self.settle(index)
        assert summary(index.lookup(keys)) == {"a": (4, {"host": 4}), "b": (2, {"host": 2})}

    def test_instances_lists_live_ones_with_their_lease(self, index: BlockIndex) -> None:
        index.heartbeat("x", ttl_s=60.0)
        index.add("y", "host", make_keys(1))
        self.settle(index)
        infos = index.instances()
        assert [i.instance for i in infos] == ["x", "y"]
        assert 0 < infos[0].lease_left_s <= 60.0
        assert infos[1].lease_left_s > 0

    def test_bad_arguments_raise(self, index: BlockIndex) -> None:
        with pytest.raises(InvalidArgumentError):
            index.add("a", "host", [b"short"])
        with pytest.raises(InvalidArgumentError):
            index.add("a", "tape", make_keys(1))
        with pytest.raises(InvalidArgumentError):
            index.remove("", "host", make_keys(1))

    def test_a_malformed_key_in_a_lookup_ends_the_prefix(self, index: BlockIndex) -> None:
        keys = make_keys(6)
        index.add("a", "host", keys)
        self.settle(index)
        assert summary(index.lookup([*keys[:3], b"bad", *keys[3:]])) == {"a": (3, {"host": 3})}

    def test_randomized_against_a_reference(self, index: BlockIndex) -> None:
        rng = random.Random(7)
        universe = make_keys(24, "rand")
        prompts = [universe[:24], universe[:10], universe[5:20], universe[::2]]
        model = ReferenceIndex()
        names = ["p", "q", "r"]
        for _step in range(120):
            op = rng.random()
            inst = rng.choice(names)
            tier = rng.choice(TIERS)
            start = rng.randrange(24)
            keys = universe[start : start + rng.randrange(1, 12)]
            if op < 0.6:
                index.add(inst, tier, keys)
                model.add(inst, tier, keys)
            elif op < 0.93:
                index.remove(inst, tier, keys)
                model.remove(inst, tier, keys)
            else:
                index.clear(inst)
                model.clear(inst)
            if _step % 10 == 9:
                self.settle(index)
                for prompt in prompts:
                    assert summary(index.lookup(prompt)) == model.lookup(prompt), f"step {_step}"

    def test_concurrent_writers_and_readers(self, index: BlockIndex) -> None:
        keys = make_keys(64)
        errors: list[BaseException] = []

        def writer(name: str) -> None:
            try:
                for i in range(20):
                    index.add(name, "host", keys[: 1 + (i * 3) % 64])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def reader() -> None:
            try:
                for _ in range(30):
                    result = index.lookup(keys)
                    for m in result.matches.values():
                        assert 0 < m.blocks <= 64
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(3)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        self.settle(index)
        assert summary(index.lookup(keys)) == {f"w{i}": (58, {"host": 58}) for i in range(3)}
