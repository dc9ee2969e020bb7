"""A recording KV connector: vLLM's ExampleConnector plus a JSON-lines log of every hook call.

Load it with::

    {"kv_connector": "ProbeConnector", "kv_connector_module_path": "tests.connector.probe_connector",
     "kv_role": "kv_both",
     "kv_connector_extra_config": {"shared_storage_path": DIR, "probe_log": FILE}}

Each line of ``probe_log`` is one call: ``{"pid", "role", "hook", ...details}``. The details describe what
vLLM hands a connector on this build (tensor shapes and storage sharing in ``register_kv_caches``, the type
of ``attn_metadata`` in ``save_kv_layer``, the fields of the scheduler output, the request's attributes), so
the harness tests can assert on them and the real connector can be written against measured facts. Both
roles append to the same file (with ``O_APPEND``, one ``write`` per line), so it also shows which process
each role runs in.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector

_LOCK = threading.Lock()


def _describe(value: Any) -> Any:
    """A JSON-able summary of a value: tensors by shape/dtype, objects by type name."""
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "device": str(value.device)}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return {
                "type": type(value).__name__,
                "len": len(value),
                "head": [_describe(v) for v in value[:3]],
            }
        return [_describe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"set": sorted(str(v) for v in value)[:8], "len": len(value)}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in list(value.items())[:8]}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}"}


class ProbeConnector(ExampleConnector):
    """ExampleConnector (so loads and saves really happen) that logs each hook call."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._probe_log = str(self._kv_transfer_config.get_from_extra_config("probe_log", ""))
        self._seen_layers: set[str] = set()
        self._record(
            "__init__",
            block_size=vllm_config.cache_config.block_size,
            num_gpu_blocks=vllm_config.cache_config.num_gpu_blocks,
            kv_cache_config=_describe(kv_cache_config),
            num_blocks=getattr(kv_cache_config, "num_blocks", None),
            groups=[
                {"layers": list(g.layer_names), "spec": type(g.kv_cache_spec).__name__}
                for g in getattr(kv_cache_config, "kv_cache_groups", [])
            ],
            kv_buffer_device=self._kv_transfer_config.kv_buffer_device,
            kv_load_failure_policy=self._kv_transfer_config.kv_load_failure_policy,
            requires_kv_delivery=self.requires_kv_delivery,
        )

    def _record(self, hook: str, **details: Any) -> None:
        if not self._probe_log:
            return
        line = json.dumps({"pid": os.getpid(), "role": self.role.name, "hook": hook, **details}, default=str)
        with _LOCK:
            fd = os.open(self._probe_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        ptrs = {name: t.untyped_storage().data_ptr() for name, t in kv_caches.items()}
        self._record(
            "register_kv_caches",
            layers={
                name: {
                    "shape": list(t.shape),
                    "stride": list(t.stride()),
                    "dtype": str(t.dtype),
                    "device": str(t.device),
                    "contiguous": t.is_contiguous(),
                    "storage_offset": t.storage_offset(),
                    "storage_nbytes": t.untyped_storage().nbytes(),
                    "data_ptr": t.data_ptr(),
                }
                for name, t in kv_caches.items()
            },
            one_storage=len(set(ptrs.values())) == 1,
        )
        super().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        am = forward_context.attn_metadata
        self._record(
            "start_load_kv",
            attn_metadata_type=type(am).__name__,
            attn_metadata_keys=sorted(am)[:4] if isinstance(am, dict) else None,
            no_compile_layers=sorted(forward_context.no_compile_layers)[:4],
            kwargs=sorted(kwargs),
            loads=sum(not r.is_store for r in self._get_connector_metadata().requests),  # type: ignore[attr-defined]
        )
        super().start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._record("wait_for_layer_load", layer_name=layer_name)
        super().wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        details: dict[str, Any] = {"layer_name": layer_name, "kv_layer": _describe(kv_layer)}
        if layer_name not in self._seen_layers:
            self._seen_layers.add(layer_name)
            details["attn_metadata_type"] = (
                f"{type(attn_metadata).__module__}.{type(attn_metadata).__qualname__}"
            )
            details["attn_metadata_fields"] = {
                k: _describe(v) for k, v in sorted(vars(attn_metadata).items()) if not k.startswith("__")
            }
            details["kv_layer_data_ptr"] = kv_layer.data_ptr()
        self._record("save_kv_layer", **details)
        super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self._record("wait_for_save")
        super().wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if finished_req_ids:
            self._record("get_finished", finished_req_ids=sorted(finished_req_ids))
        return super().get_finished(finished_req_ids)

    def shutdown(self) -> None:
        self._record("shutdown")
        super().shutdown()

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        result = super().get_num_new_matched_tokens(request, num_computed_tokens)
        self._record(
            "get_num_new_matched_tokens",
            request_id=request.request_id,
            num_computed_tokens=num_computed_tokens,
            num_tokens=request.num_tokens,
            num_prompt_tokens=request.num_prompt_tokens,
            request_num_computed_tokens=request.num_computed_tokens,
            num_block_hashes=len(request.block_hashes),
            block_hash_type=type(request.block_hashes[0]).__name__ if request.block_hashes else None,
            block_hash_len=len(request.block_hashes[0]) if request.block_hashes else None,
            lora_request=_describe(request.lora_request),
            cache_salt=request.cache_salt,
            kv_transfer_params=_describe(request.kv_transfer_params),
            mm_features=len(request.mm_features),
            status=str(request.status),
            result=list(result),
        )
        return result

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._record(
            "update_state_after_alloc",
            request_id=request.request_id,
            block_ids=_describe(blocks.get_block_ids()),
            num_external_tokens=num_external_tokens,
        )
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        cached = scheduler_output.scheduled_cached_reqs
        self._record(
            "build_connector_meta",
            new_reqs=[
                {
                    "req_id": r.req_id,
                    "prompt_len": len(r.prompt_token_ids or []),
                    "block_ids": _describe(r.block_ids),
                    "num_computed_tokens": r.num_computed_tokens,
                }
                for r in scheduler_output.scheduled_new_reqs
            ],
            cached_reqs={
                "req_ids": cached.req_ids,
                "resumed_req_ids": sorted(cached.resumed_req_ids),
                "new_block_ids": _describe(cached.new_block_ids),
                "num_computed_tokens": cached.num_computed_tokens,
                "num_output_tokens": cached.num_output_tokens,
            },
            num_scheduled_tokens=scheduler_output.num_scheduled_tokens,
            finished_req_ids=sorted(scheduler_output.finished_req_ids),
            preempted_req_ids=_describe(scheduler_output.preempted_req_ids),
            has_sync_kv_loads=scheduler_output.has_sync_kv_loads,
            new_block_ids_to_zero=_describe(scheduler_output.new_block_ids_to_zero),
        )
        return super().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._record("update_connector_output", output=_describe(vars(connector_output)))
        super().update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._record(
            "request_finished",
            request_id=request.request_id,
            block_ids=_describe(block_ids),
            num_tokens=request.num_tokens,
            num_computed_tokens=request.num_computed_tokens,
            status=str(request.status),
        )
        return super().request_finished(request, block_ids)

    def take_events(self) -> Any:
        return super().take_events()
