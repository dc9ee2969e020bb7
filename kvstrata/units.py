"""Parsing and printing of byte sizes such as ``512MiB`` or ``4GiB``."""

from __future__ import annotations

import re

from kvstrata.errors import ConfigError

__all__ = ["format_size", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Return the number of bytes in ``value``: an int, or a string like ``"512MiB"``, ``"4GiB"``, ``"0"``."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return value
    if isinstance(value, float):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return int(value)
    match = _SIZE_RE.match(value)
    if match is None:
        raise ConfigError(f"not a size: {value!r} (examples: 4096, 512MiB, 4GiB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError(f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)")
    return int(float(number) * factor)


def format_size(num_bytes: int) -> str:
    """Print a byte count with a binary unit, e.g. ``1.5 GiB``."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
