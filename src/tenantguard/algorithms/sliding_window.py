"""Sliding-window counter (the weighted two-window estimate).

The count over the last ``window`` seconds is estimated as
``previous × (1 − f) + current``, where ``f`` is the fraction of the current aligned
window already elapsed. State: ``(window_start, previous, current)``.

Error bound. Every aligned window admits at most ``limit`` on its own, so any interval of
length ``window`` holds fewer than ``2 × limit``. More precisely, the interval ending at
fraction ``f`` of a window holds at most ``limit + previous × f − (previous − tail)``
where ``tail`` is how much of the previous window's traffic fell in its last ``1 − f``:
the estimate is exact when the previous window's traffic was spread evenly, and the
worst case (all of it at the very end of the previous window) admits up to
``limit × (1 + f)``. ``tests/test_algorithm_properties.py`` checks these bounds.
"""

from __future__ import annotations

import math

from tenantguard.algorithms._outcome import EARLY, EPSILON, NEVER, Outcome

__all__ = ["expires", "step"]

State = tuple[float, int, int]


def step(
    state: State | None, now: float, limit: int, window: float, burst: int, cost: int
) -> Outcome:
    start = now - now % window
    previous = current = 0
    if state is not None:
        if state[0] == start:
            previous, current = state[1], state[2]
        elif state[0] == start - window:
            previous = state[2]
    weight = 1.0 - (now - start) / window
    estimate = previous * weight + current
    reset = start + window
    # the previous window's weight may fall EARLY seconds ahead of the clock's resolution
    if estimate + cost <= limit + EPSILON + previous * EARLY / window:
        remaining = math.floor(limit - estimate - cost + EPSILON)
        if remaining < 0:  # noqa: PLR1730 - max() is a builtin call, on the admitting path
            remaining = 0
        return (True, (start, previous, current + cost), remaining, reset, 0.0)
    remaining = max(math.floor(limit - estimate + EPSILON), 0)
    if cost > limit:
        return (False, state, remaining, reset, NEVER)
    if current + cost <= limit:
        # wait for the previous window's weight to fall far enough
        at = start + window * (1.0 - (limit - current - cost) / previous)
    else:
        # wait into the next window, where the current count becomes the previous one
        at = reset + window * (1.0 - (limit - cost) / current)
    return (False, state, remaining, reset, max(at - now, EARLY))


def expires(state: State, window: float) -> float:
    return state[0] + 2 * window
