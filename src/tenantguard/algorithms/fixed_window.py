"""Fixed window aligned to window boundaries.

Windows start at multiples of their length since the Unix epoch, so a 1-minute window
resets on the minute (as Okta's ``X-Rate-Limit-Reset`` does) and every replica agrees on
the boundaries without talking. State: ``(window_start, used)``.
"""

from __future__ import annotations

from tenantguard.algorithms._outcome import NEVER, Outcome

__all__ = ["expires", "step"]

State = tuple[float, int]


def step(
    state: State | None, now: float, limit: int, window: float, burst: int, cost: int
) -> Outcome:
    start = now - now % window
    reset = start + window
    used = state[1] if state is not None and state[0] == start else 0
    if used + cost <= limit:
        return (True, (start, used + cost), limit - used - cost, reset, 0.0)
    retry = NEVER if cost > limit else reset - now
    return (False, state, max(limit - used, 0), reset, retry)


def expires(state: State, window: float) -> float:
    """After this instant the state means the same as no state."""
    return state[0] + window
