"""kvstrata: a distributed, tiered KV-cache service for LLM inference.

The public face is this module's ``__all__``; everything else is reached through its subpackage.
Names are imported lazily so that ``import kvstrata`` stays cheap (torch loads on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AsyncClient": "kvstrata.client",
    "Client": "kvstrata.client",
    "ChunkKey": "kvstrata.core.keys",
    "ChunkMeta": "kvstrata.core.chunk",
    "ConnectError": "kvstrata.errors",
    "KVLayout": "kvstrata.core.layout",
    "KVStrataConfig": "kvstrata.config",
    "KVStrataError": "kvstrata.errors",
    "Namespace": "kvstrata.core.keys",
    "RequestTimeoutError": "kvstrata.errors",
    "Store": "kvstrata.kvstore.store",
    "StoreError": "kvstrata.errors",
    "TransportError": "kvstrata.errors",
    "block_keys": "kvstrata.core.keys",
    "chunk_keys": "kvstrata.core.keys",
    "load_config": "kvstrata.config",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstrata' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
