"""Logging set-up shared by the commands (``kvstrata serve``, ``kvstrata index ...``)."""

from __future__ import annotations

import logging

__all__ = ["setup_logging"]


def setup_logging(level: str) -> None:
    """Configure the root logger once for a command."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
