"""Lazy registries: a backend named by ``"module:attribute"``, imported on first use.

Transports, server extensions, indexes and kernels are chosen by name, so optional dependencies (NIXL,
Redis, Triton, vLLM) are imported only when their backend is selected.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstrata.errors import InvalidArgumentError

__all__ = ["load_target"]


def load_target(target: str, what: str) -> Any:
    """The attribute named by ``"module:attribute"``; ``what`` ("transport", ...) names it in errors."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise InvalidArgumentError(f"{what} module {module_name} is not available: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise InvalidArgumentError(f"{what} {target} does not exist") from exc
