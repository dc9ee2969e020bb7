"""The key scheme: namespaces, chained block keys and chunk keys (specified byte by byte in docs/keys.md).

- A :class:`Namespace` is (model id, layout fingerprint, optional tenant salt); its 32-byte ``secret``
  keys the hash, so two namespaces never share a key.
- ``key(block i) = BLAKE2b-128[key=secret](key(block i-1) || token ids of block i as u32-LE || extras)``,
  with 16 zero bytes as the parent of block 0. Only full blocks get keys.
- A chunk's key is the key of its last block (:class:`ChunkKey`).

Keys come from token ids, never from the engine's own block hash, so they do not depend on the engine's
hash algorithm or PYTHONHASHSEED, and anything (a router in another language) can compute them.
Hashing is vectorised: the tokens are converted once to little-endian u32 bytes, and each block costs one
copy of a pre-keyed BLAKE2b state.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from kvstrata.core.layout import KVLayout
from kvstrata.errors import InvalidArgumentError

__all__ = [
    "KEY_BYTES",
    "ROOT_PARENT",
    "ChunkKey",
    "ExtraKey",
    "Namespace",
    "block_keys",
    "chunk_keys",
    "encode_extra_keys",
]

#: Length of every block and chunk key, in bytes.
KEY_BYTES = 16
#: The parent of a prompt's first block.
ROOT_PARENT = bytes(KEY_BYTES)
_NS_DOMAIN = b"kvstrata-namespace-v1\x00"

#: An extra key mixed into a block's hash: a LoRA name, a cache salt, a multimodal hash.
ExtraKey = Union[str, bytes, int]

TokenIds = Union[Sequence[int], "np.ndarray[Any, Any]", Any]


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


@dataclass(frozen=True)
class Namespace:
    """The scope of a key: one model, one KV layout, optionally one tenant.

    ``secret`` (32 bytes) is the BLAKE2b key of every block hash in this namespace. It and the keyed hash
    state are computed once per namespace, so hashing a prompt costs only the per-block work.
    """

    model_id: str
    layout_fingerprint: bytes
    tenant_salt: bytes = b""

    def __post_init__(self) -> None:
        if len(self.layout_fingerprint) != 16:
            raise InvalidArgumentError("layout_fingerprint must be 16 bytes (KVLayout.fingerprint)")
        model = self.model_id.encode()
        material = (
            _NS_DOMAIN
            + _u32(len(model))
            + model
            + self.layout_fingerprint
            + _u32(len(self.tenant_salt))
            + self.tenant_salt
        )
        secret = hashlib.blake2b(material, digest_size=32).digest()
        # A frozen dataclass: derived values are set once, here, and never change.
        object.__setattr__(self, "_secret", secret)
        object.__setattr__(self, "_hasher", hashlib.blake2b(key=secret, digest_size=KEY_BYTES))

    @classmethod
    def for_layout(cls, model_id: str, layout: KVLayout, tenant_salt: bytes | str = b"") -> Namespace:
        """The namespace of ``model_id`` served with ``layout``."""
        salt = tenant_salt.encode() if isinstance(tenant_salt, str) else tenant_salt
        return cls(model_id, layout.fingerprint, salt)

    @property
    def secret(self) -> bytes:
        """The 32-byte hash key: BLAKE2b-256 over the domain, the model id, the fingerprint, the salt."""
        return typing.cast(bytes, self.__dict__["_secret"])

    def hasher(self) -> Any:
        """A fresh BLAKE2b-128 state keyed with :attr:`secret` (a copy of a state keyed once)."""
        return self.__dict__["_hasher"].copy()

    @property
    def id(self) -> bytes:
        """A public 8-byte name of the namespace (for index key prefixes); not the secret."""
        return hashlib.blake2b(self.secret, digest_size=8, person=b"kvstrata-ns-id").digest()


def encode_extra_keys(extras: Iterable[ExtraKey]) -> bytes:
    """Encode extra keys: per item a tag byte (1 str, 2 bytes, 3 int), a u32-LE length, the value bytes.

    Ints are encoded as signed 64-bit little-endian. An empty sequence encodes to nothing, so blocks
    without extras hash exactly the parent and the tokens.
    """
    out = bytearray()
    for item in extras:
        if isinstance(item, str):
            raw, tag = item.encode(), 1
        elif isinstance(item, (bytes, bytearray, memoryview)):
            raw, tag = bytes(item), 2
        elif isinstance(item, int) and not isinstance(item, bool):
            raw, tag = struct.pack("<q", item), 3
        else:
            raise InvalidArgumentError(f"an extra key must be str, bytes or int, not {type(item).__name__}")
        out += bytes((tag,)) + _u32(len(raw)) + raw
    return bytes(out)


def _token_bytes(tokens: TokenIds) -> bytes:
    if isinstance(tokens, (list, tuple)):
        # array.array converts a list of ints in C, about 2.5x faster than going through numpy.
        try:
            packed = array.array("I", tokens)
        except OverflowError as exc:
            raise InvalidArgumentError("token ids must be in [0, 2**32)") from exc
        except TypeError:
            pass  # not plain ints (nested lists, floats): numpy below gives the precise error
        else:
            if packed.itemsize == 4:
                if sys.byteorder != "little":
                    packed.byteswap()
                return packed.tobytes()
    if hasattr(tokens, "numpy") and hasattr(tokens, "dtype"):  # a torch tensor, without importing torch
        tokens = typing.cast(Any, tokens).detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<u4"):
        if int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF:
            raise InvalidArgumentError("token ids must be in [0, 2**32)")
        arr = arr.astype("<u4")
    return arr.tobytes()


def block_keys(
    namespace: Namespace,
    tokens: TokenIds,
    block_size: int,
    *,
    extra_keys: Sequence[ExtraKey] = (),
    block_extra_keys: Sequence[Sequence[ExtraKey]] | None = None,
    parent: bytes = ROOT_PARENT,
) -> list[bytes]:
    """The chained keys of every full block of ``tokens`` (a trailing partial block gets none).

    ``extra_keys`` apply to every block (LoRA name, cache salt); ``block_extra_keys[i]``, when given, are
    appended for block i (multimodal hashes of the inputs that block covers). ``parent`` continues a chain
    (the key of the block before ``tokens[0]``).
    """
    if block_size <= 0:
        raise InvalidArgumentError("block_size must be positive")
    if len(parent) != KEY_BYTES:
        raise InvalidArgumentError(f"parent must be {KEY_BYTES} bytes")
    data = _token_bytes(tokens)
    step = block_size * 4
    num_blocks = len(data) // step
    if block_extra_keys is not None and len(block_extra_keys) < num_blocks:
        raise InvalidArgumentError("block_extra_keys must have an entry for every full block")
    common = encode_extra_keys(extra_keys)
    base = namespace.hasher()
    view = memoryview(data)
    out: list[bytes] = []
    append = out.append
    if block_extra_keys is None:
        for start in range(0, num_blocks * step, step):
            h = base.copy()
            h.update(parent)
            h.update(view[start : start + step])
            if common:
                h.update(common)
            parent = h.digest()
            append(parent)
    else:
        for i in range(num_blocks):
            h = base.copy()
            h.update(parent)
            h.update(view[i * step : (i + 1) * step])
            extras = common + encode_extra_keys(block_extra_keys[i])
            if extras:
                h.update(extras)
            parent = h.digest()
            append(parent)
    return out


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """A chunk: a run of consecutive blocks, named by the key of its last block.

    ``digest`` is what tiers and servers store the chunk under; ``block_keys`` are the blocks it covers
    (reported in events so the index works in blocks); ``first_block`` is the index of its first block in
    the prompt.
    """

    digest: bytes
    block_keys: tuple[bytes, ...]
    first_block: int = 0

    @property
    def num_blocks(self) -> int:
        """Blocks covered by this chunk."""
        return len(self.block_keys)


def chunk_keys(
    keys: Sequence[bytes], blocks_per_chunk: int, *, include_partial: bool = False
) -> list[ChunkKey]:
    """Group block keys into chunks of ``blocks_per_chunk`` (the last, shorter one only if asked)."""
    if blocks_per_chunk <= 0:
        raise InvalidArgumentError("blocks_per_chunk must be positive")
    out: list[ChunkKey] = []
    full = len(keys) - len(keys) % blocks_per_chunk
    end = len(keys) if include_partial else full
    for start in range(0, end, blocks_per_chunk):
        group = tuple(keys[start : start + blocks_per_chunk])
        out.append(ChunkKey(group[-1], group, start))
    return out
