"""``KVStrataConnector``: kvstrata as a vLLM KV connector (``--kv-transfer-config``).

    --kv-transfer-config '{"kv_connector": "KVStrataConnector",
                           "kv_connector_module_path": "kvstrata.connector.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"connector": {"servers": ["kvs+shm://127.0.0.1:7470"]}}}'

``kv_connector_extra_config`` is kvstrata's own configuration (the sections of ``kvstrata config``:
``connector``, ``store``, ``client``, ``index``, ``kernels``; plus ``config_file``, a TOML file read first).
Without ``connector.servers`` each worker keeps an embedded Store (host tier, disk tier).

This module is a thin facade: vLLM builds one instance in the scheduler process (role SCHEDULER), which
delegates to :class:`~kvstrata.connector.scheduler.SchedulerSide`, and one in each worker (role WORKER),
which delegates to :class:`~kvstrata.connector.worker.WorkerSide`. The halves talk only through vLLM's
per-step metadata, as msgpack bytes (:mod:`kvstrata.connector.metadata`). Hooks that vLLM versions add
or drop are feature-detected: only the portable ones are overridden (docs/vllm.md).

Nothing here raises into vLLM on a cache failure: a dead server, a full disk, a corrupt chunk are misses,
counted in the connector stats, and a chunk that fails to load is reported as a load error so that vLLM
recomputes it (with ``kv_load_failure_policy: recompute``; with ``fail`` it fails the request instead,
which the start-up log warns about).
"""

from __future__ import annotations

import inspect
import logging
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvstrata.config import KVStrataConfig, default_cache_dir, load_config
from kvstrata.connector.metadata import TierChange, decode_plan, decode_report, encode
from kvstrata.connector.scheduler import SchedulerSide
from kvstrata.connector.spec import EngineSpec, default_chunk_tokens
from kvstrata.connector.worker import WorkerSide
from kvstrata.errors import ConfigError
from kvstrata.index.event_format import TIER_MEDIUMS
from kvstrata.logs import attach_handler

__all__ = ["KVStrataConnector", "KVStrataMetadata", "KVStrataStats", "KVStrataWorkerMetadata"]

log = logging.getLogger("kvstrata.connector")

_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass
class KVStrataMetadata(KVConnectorMetadata):
    """The scheduler's step plan for the workers, as msgpack bytes."""

    payload: bytes = b""


@dataclass
class KVStrataWorkerMetadata(KVConnectorWorkerMetadata):
    """The workers' reports for the scheduler, as msgpack bytes (one entry per report)."""

    payloads: list[bytes] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVStrataWorkerMetadata):
            self.payloads.extend(other.payloads)
        return self


@dataclass
class KVStrataStats(KVConnectorStats):
    """Counters (hits and tokens per tier, chunks and bytes loaded and saved, load errors) and lookup
    latencies (``lookup_s``), summed across workers and steps until vLLM's logger reduces them."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(name, []).extend(value)
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for name, value in self.data.items():
            if isinstance(value, list):
                if value:
                    ordered = sorted(value)
                    out[f"{name}_p50_ms"] = round(statistics.median(ordered) * 1e3, 3)
                    out[f"{name}_p99_ms"] = round(
                        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3
                    )
            else:
                out[name] = value
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


def engine_spec(vllm_config: Any, config: KVStrataConfig) -> EngineSpec:
    """The KV geometry of the engine ``vllm_config`` describes (both halves compute the same one)."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    if getattr(parallel, "pipeline_parallel_size", 1) > 1:
        raise ConfigError("kvstrata's connector does not support pipeline parallelism yet")
    if cache.cache_dtype == "auto":
        dtype = str(model.dtype).removeprefix("torch.")
    else:
        dtype = _CACHE_DTYPES.get(cache.cache_dtype, cache.cache_dtype)
    served = model.served_model_name
    model_id = config.connector.model_id or (served[0] if isinstance(served, list) else served) or model.model
    return EngineSpec(
        model_id=str(model_id),
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_size=model.get_head_size(),
        dtype=dtype,
        block_size=cache.block_size,
        chunk_tokens=default_chunk_tokens(cache.block_size, config.connector.chunk_tokens),
        tp_size=parallel.tensor_parallel_size,
        engine_layout="cpu_packed" if current_platform.is_cpu() else "kv_first_nhd",
        tenant_salt=config.connector.tenant_salt,
    )


def connector_config(extra: dict[str, Any] | None) -> KVStrataConfig:
    """kvstrata's configuration from ``kv_connector_extra_config`` (``config_file`` read first)."""
    extra = dict(extra or {})
    path = extra.pop("config_file", None)
    return load_config(path, extra)


def _layer_order(names: Iterable[str]) -> list[str]:
    """Layer names in model order (by their layer number; vLLM's dict order otherwise)."""
    names = list(names)
    numbers = [re.findall(r"\d+", name) for name in names]
    if all(numbers):
        return [n for _, n in sorted(zip([int(x[0]) for x in numbers], names, strict=True))]
    return names


class KVStrataConnector(KVConnectorBase_V1):
    """kvstrata's vLLM connector (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        if len(inspect.signature(KVConnectorBase_V1.__init__).parameters) > 3:
            super().__init__(vllm_config, role, kv_cache_config)
        else:  # vLLM < 0.12: two arguments
            super().__init__(vllm_config, role)  # type: ignore[call-arg]
        transfer = vllm_config.kv_transfer_config
        self._config = connector_config(getattr(transfer, "kv_connector_extra_config", None))
        attach_handler(self._config.log_level)
        self._spec = engine_spec(vllm_config, self._config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._plan_cache: tuple[bytes, Any] | None = None
        self._index: Any = None
        self._instance = self._config.instance_id or str(getattr(transfer, "engine_id", "") or "vllm")
        conn = self._config.connector
        where = ", ".join(conn.servers) if conn.servers else "an embedded store in each worker"
        if role == KVConnectorRole.SCHEDULER:
            lookup = None
            if conn.servers:
                self._client = self._open_client()
                lookup = lambda keys: self._client.lookup_prefix(keys, timeout=conn.lookup_timeout_s)  # noqa: E731
            self._scheduler = SchedulerSide(
                self._spec,
                load=conn.load,
                save=conn.save,
                save_decode=conn.save_decode,
                lookup=lookup,
                lookup_timeout_s=conn.lookup_timeout_s,
                lookup_wait_s=conn.lookup_wait_s,
                snapshot_wait_s=conn.snapshot_wait_s,
            )
            if conn.publish_index:
                from kvstrata.index.base import open_index

                self._index = open_index(
                    config=self._config.index, namespace=self._spec.namespaces[0].id.hex()
                )
            log.info("kvstrata connector: KV goes to %s; %s", where, self._spec.describe())
            policy = getattr(transfer, "kv_load_failure_policy", None)
            if policy == "fail":
                log.warning(
                    "kvstrata connector: kv_load_failure_policy is 'fail' (vLLM's default from 0.17): "
                    "a chunk that cannot be loaded then fails its request; set it to 'recompute' for a cache"
                )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._rank = get_tensor_model_parallel_rank()

    def _open_client(self) -> Any:
        from kvstrata.client import Client

        token = None
        if self._config.server.token_file:
            token = Path(self._config.server.token_file).read_bytes().strip()
        return Client(list(self._config.connector.servers), token=token, config=self._config.client)

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache, not a hand-off: a dropped save is a future miss."""
        return False

    # ==== worker side ====================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvstrata.connector.backend import EmbeddedBackend, ServersBackend
        from kvstrata.kernels import chunk_spec

        caches = [kv_caches[name] for name in _layer_order(kv_caches)]
        conn = self._config.connector
        try:
            from kvstrata.connector.worker import detect_engine_layout

            layout = detect_engine_layout(caches[0], self._spec)
            chunk_bytes = chunk_spec(caches, layout, self._spec.blocks_per_chunk).total_bytes
        except Exception as exc:
            log.error("kvstrata connector: cannot use this KV cache (%s); the connector stays off", exc)
            chunk_bytes = 0
        backend: Any
        if conn.servers:
            backend = ServersBackend(self._open_client(), max(chunk_bytes, 1), conn.max_pending_save_bytes)
        else:
            backend = EmbeddedBackend(self._open_store(max(chunk_bytes, 1)))
        self._worker = WorkerSide(self._spec, self._rank, backend, load_timeout_s=conn.load_timeout_s)
        self._worker.register_kv_caches(caches)

    def _open_store(self, chunk_bytes: int) -> Any:
        import msgspec

        from kvstrata.kvstore.store import Store

        store = self._config.store
        slot = max(store.slot_bytes, chunk_bytes)
        directory = (
            Path(store.disk_dir or default_cache_dir()) / f"vllm-tp{self._rank}-of-{self._spec.tp_size}"
        )
        cfg = msgspec.structs.replace(store, slot_bytes=slot, disk_dir=str(directory))
        try:
            return Store.from_config(cfg)
        except Exception as exc:  # a locked or unwritable disk directory: go on with memory only
            log.warning("kvstrata connector: disk tier unavailable (%s); using the host tier only", exc)
            return Store.from_config(msgspec.structs.replace(cfg, disk_cache_bytes=0))

    def _plan(self) -> Any:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVStrataMetadata)
        if self._plan_cache is None or self._plan_cache[0] is not meta.payload:
            self._plan_cache = (meta.payload, decode_plan(meta.payload))
        return self._plan_cache[1]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.start_load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete in start_load_kv (sync) or off the forward pass (async)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # chunks are gathered across all layers in wait_for_save

    def wait_for_save(self) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.save(self._plan())

    def has_connector_metadata(self) -> bool:
        return self._connector_metadata is not None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return None, (self._worker.get_finished() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._worker is None:
            return None
        return KVStrataWorkerMetadata([encode([self._worker.report()])])

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
            client = getattr(self, "_client", None)
            if client is not None:
                client.close()
            if self._index is not None:
                self._index.close()

    # ==== scheduler side =================================================================================
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        try:
            return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception:  # never fail a request because of the cache
            log.exception("kvstrata connector: lookup failed; the request computes")
            return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        ids = blocks.get_block_ids()
        self._scheduler.update_state_after_alloc(request, ids[0] if ids else [], num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        assert self._scheduler is not None
        # A server's tiers are not this host's: vLLM's HOST and DISK mean the engine's own offloading
        # tiers, and a remote store reports EXTERNAL_UNSPECIFIED (vLLM's note on CacheHitSource).
        names = {} if self._scheduler.remote else {"host": "HOST", "disk": "DISK", "device": "DEVICE"}
        out: dict[Any, int] = {}
        for tier, tokens in self._scheduler.hit_sources(request, num_external_tokens).items():
            source = getattr(CacheHitSource, names.get(tier, "EXTERNAL_UNSPECIFIED"), None)
            source = source or CacheHitSource.EXTERNAL_UNSPECIFIED
            out[source] = out.get(source, 0) + tokens
        return out or super().get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return KVStrataMetadata(encode(self._scheduler.build_plan(scheduler_output)))

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid:
            self._scheduler.load_failed(invalid)
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVStrataWorkerMetadata):
            for payload in meta.payloads:
                try:
                    self._scheduler.apply_reports(decode_report(payload))
                except Exception:
                    log.exception("kvstrata connector: a worker report was dropped")

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is not None:
            self._scheduler.request_finished(request)
        return False, None

    def take_events(self) -> Iterable[KVCacheEvent]:
        if self._scheduler is None:
            return ()
        changes = self._scheduler.take_events()
        if self._index is not None:
            self._publish(changes)
        if not self._config.connector.events:
            return ()
        return [event for change in changes if (event := self._event(change)) is not None]

    def _event(self, change: TierChange) -> KVCacheEvent | None:
        medium = TIER_MEDIUMS.get(change.tier, change.tier.upper())
        if not change.block_keys:
            return None
        hashes: list[Any] = list(change.block_keys)
        if change.kind == "stored":
            return BlockStored(
                block_hashes=hashes,
                parent_block_hash=None,
                token_ids=[],
                block_size=self._spec.block_size,
                lora_id=None,
                medium=medium,
                lora_name=None,
            )
        if change.kind == "removed":
            return BlockRemoved(block_hashes=hashes, medium=medium)
        return None

    def _publish(self, changes: list[TierChange]) -> None:
        for change in changes:
            try:
                if change.kind == "stored" and change.block_keys:
                    self._index.add(self._instance, change.tier, list(change.block_keys))
                elif change.kind == "removed" and change.block_keys:
                    self._index.remove(self._instance, change.tier, list(change.block_keys))
            except Exception as exc:  # the index is a hint: never fail a step for it
                log.warning("kvstrata connector: index update failed: %s", exc)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._scheduler is None:
            return None
        counters, latencies = self._scheduler.take_counters()
        data: dict[str, Any] = dict(counters)
        if latencies:
            data["lookup_s"] = latencies
        return KVStrataStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVStrataStats(data=dict(data or {}))
