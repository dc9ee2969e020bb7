"""The global block index: embedded and Redis backends, engine KV-event ingestion, and prefix scoring.

The contract and the backend registry are re-exported here; backends (``kvstrata.index.memory``,
``kvstrata.index.redis``), ingestion (``kvstrata.index.ingest``), the tier-event publisher
(``kvstrata.index.publisher``) and scoring (``kvstrata.index.scoring``) are imported where used, so that
redis and ZMQ load only when selected.
"""

from kvstrata.index.base import (
    TIERS,
    BlockIndex,
    IndexStats,
    InstanceInfo,
    InstanceMatch,
    LookupResult,
    open_index,
    register_backend,
)

__all__ = [
    "TIERS",
    "BlockIndex",
    "IndexStats",
    "InstanceInfo",
    "InstanceMatch",
    "LookupResult",
    "open_index",
    "register_backend",
]
