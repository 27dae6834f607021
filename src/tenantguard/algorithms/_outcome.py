"""What every algorithm returns."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ALLOWED",
    "EARLY",
    "EPSILON",
    "NEVER",
    "REMAINING",
    "RESET",
    "RETRY_AFTER",
    "STATE",
    "Outcome",
]

NEVER = float("inf")
"""``retry_after`` of a request that can never pass (its cost exceeds the limit)."""

EPSILON = 1e-9
"""Tolerance when a fractional count is floored or compared (``remaining``, sliding
estimates): sums of float fractions land a hair below the whole number they mean."""

EARLY = 1e-6
"""Seconds by which a refill-based admission may come early. A float epoch resolves only
about 0.24 µs, so ``start + 0.05`` may be stored as 0.04999995 s later than ``start``:
without this, a token due 50 ms after a drain would be refused at exactly 50 ms."""


Outcome = tuple[bool, Any, int, float, float]
"""One rule's answer to one request: ``(allowed, state, remaining, reset, retry_after)``.

A plain tuple rather than a named one: it is built on every check of every rule, and
plain tuples cost a third as much. Index it with the constants below.

``state`` is the state to store if the request is admitted; a denial returns the
state it was given, so denying consumes nothing. ``reset`` is the epoch second at
which the limit is whole again; ``retry_after`` the seconds until a request of the
same cost could pass (0.0 when admitted, ``NEVER`` when it never can).
"""

ALLOWED, STATE, REMAINING, RESET, RETRY_AFTER = range(5)
