"""Benchmark of the key scheme: block keys per second over whole prompts, on one core.

The ceiling is the same number of BLAKE2b-128 digests of the same bytes with no chaining and no Python
loop over blocks beyond the minimum (one keyed hash per block of a pre-built bytes object), measured in the
same run, so the ratio shows what the chaining and conversion cost. The goal is absolute: >= 5 M tokens/s.

Run: ``python bench/keys.py``.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import best_time, emit, log
from kvstrata.core.keys import Namespace, block_keys
from kvstrata.core.layout import KVLayout


def main() -> None:
    """Hash prompts of several lengths and block sizes; print tokens/s against the bare-hash ceiling."""
    rng = np.random.default_rng(0)
    for block_size in (16, 128):
        layout = KVLayout(
            num_layers=32,
            num_kv_heads=8,
            head_size=128,
            block_size=block_size,
            chunk_tokens=max(256, block_size),
        )
        ns = Namespace.for_layout("bench-model", layout)
        for num_tokens in (8_192, 131_072):
            tokens_list = rng.integers(0, 150_000, size=num_tokens).tolist()
            tokens_array = np.asarray(tokens_list, dtype=np.int64)
            data = np.asarray(tokens_list, dtype="<u4").tobytes()
            secret = ns.secret
            step = block_size * 4

            def bare(data: bytes = data, step: int = step, secret: bytes = secret) -> None:
                for start in range(0, len(data), step):
                    hashlib.blake2b(data[start : start + step], key=secret, digest_size=16).digest()

            def from_list(tokens: list[int] = tokens_list, bs: int = block_size, ns: Namespace = ns) -> None:
                block_keys(ns, tokens, bs)

            def from_array(
                tokens: np.ndarray = tokens_array, bs: int = block_size, ns: Namespace = ns
            ) -> None:
                block_keys(ns, tokens, bs)

            repeat = 7 if num_tokens < 100_000 else 3
            ceiling = num_tokens / best_time(bare, repeat=repeat)
            case = f"block{block_size}_tokens{num_tokens}"
            emit(
                "keys",
                f"{case}_list",
                num_tokens / best_time(from_list, repeat=repeat) / 1e6,
                "Mtok/s",
                ceiling / 1e6,
            )
            emit(
                "keys",
                f"{case}_ndarray",
                num_tokens / best_time(from_array, repeat=repeat) / 1e6,
                "Mtok/s",
                ceiling / 1e6,
            )
    log("goal: >= 5 Mtok/s on one core")


if __name__ == "__main__":
    main()
