"""Kernel tests: Triton's interpreter on a machine without CUDA, compiled kernels where CUDA is present.

``TRITON_INTERPRET=1`` must be set before any module defining a Triton kernel is imported; kvstrata imports
those lazily, on the first Triton call, so setting it here (at collection) is early enough.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.conftest import require

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where the Triton kernels run: cpu (under the interpreter) and cuda (compiled, marked gpu)."""
    require(HAS_TRITON, "triton")
    if request.param == "cuda":
        if not HAS_CUDA:
            pytest.skip("no CUDA device")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs compiled on this machine; the cuda parameter covers it")
    return torch.device(request.param)
