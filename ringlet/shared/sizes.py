"""Byte counts for people, in the binary units the dashboard and `ringlet ps` use elsewhere."""

from __future__ import annotations

_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def _unit(count: float) -> tuple[str, int]:
    return next(((name, size) for name, size in _UNITS if count >= size), ("B", 1))


def _number(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def format_bytes(count: float) -> str:
    """450 MiB, 1.1 GiB, 12 KiB."""
    name, size = _unit(count)
    return f"{_number(count / size)} {name}"


def format_bytes_of(done: float, total: float) -> str:
    """Both in the total's unit: 0.45/1.1 GiB."""
    name, size = _unit(total)
    return f"{_number(done / size)}/{_number(total / size)} {name}"
