"""Token bucket: capacity ``burst`` tokens, refilled continuously at ``limit / window``.

``200`` per ``10s`` is a 200-token bucket refilled at 20 tokens/s.

State: ``(wait, at)``, how long the bucket needed at instant ``at`` to be full again.
Tokens at ``now`` are ``burst − max(0, wait − (now − at)) × rate``. Storing a duration
beside the instant, rather than one absolute "full at" instant, keeps the arithmetic on
small numbers: at epoch magnitudes a float resolves only ~0.2 µs, and an absolute instant
advanced by 50 ms two hundred times drifts by tens of microseconds, enough to refuse a
token that has refilled. Expiry needs no parameters: the state means the same as a new
bucket once ``at + wait`` has passed.
"""

from __future__ import annotations

from tenantguard.algorithms._outcome import EARLY, EPSILON, NEVER, Outcome

__all__ = ["State", "expires", "step"]

State = tuple[float, float]


def step(
    state: State | None, now: float, limit: int, window: float, burst: int, cost: int
) -> Outcome:
    if limit <= 0:
        return (False, state, 0, now, NEVER)
    rate = limit / window
    wait = state[0] - (now - state[1]) if state is not None else 0.0
    if wait < 0.0:  # noqa: PLR1730 - max() is a builtin call, and this runs on every check
        wait = 0.0
    tokens = burst - wait * rate
    if tokens + EARLY * rate >= cost:
        wait += cost / rate
        left = tokens - cost + EPSILON
        return (True, (wait, now), int(left) if left > 0 else 0, now + wait, 0.0)
    retry = NEVER if cost > burst else (cost - tokens) / rate
    return (False, state, int(tokens + EPSILON) if tokens > 0 else 0, now + wait, retry)


def expires(state: State, window: float) -> float:
    return state[1] + state[0]
