"""Logging set-up shared by the commands (``kvstrata serve``, ``kvstrata index ...``)."""

from __future__ import annotations

import logging

__all__ = ["attach_handler", "setup_logging"]


def setup_logging(level: str) -> None:
    """Configure the root logger once for a command."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def attach_handler(level: str) -> None:
    """Give the ``kvstrata`` logger a handler when nothing else would print its records (inside an engine
    such as vLLM, which configures only its own logger), so that start-up lines and warnings are seen."""
    logger = logging.getLogger("kvstrata")
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [kvstrata] %(message)s", "%m-%d %H:%M:%S")
    )
    logger.addHandler(handler)
