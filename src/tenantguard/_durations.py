"""Durations as written in policy files: ``500ms``, ``10s``, ``1m``, ``1h``, ``14d``, ``1w``."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PATTERN = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ``ValueError`` with the accepted forms otherwise."""
    match = _PATTERN.match(text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"{text!r} is not a duration; expected a positive whole number and a unit "
            "(ms, s, m, h, d, w), such as 10s, 1m, 1h or 14d"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest policy spelling of ``seconds`` (used by ``check`` and ``explain``)."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"
