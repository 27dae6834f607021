"""Concurrency: at most ``limit`` requests in flight, each holding a lease.

A lease ends when released or, if its holder crashed or forgot, when ``ttl`` has passed.
State: a tuple of ``(lease_id, expires_at, cost)``, kept small by dropping expired leases
on every step. Tuples, not a dict, so a step is a pure function of its inputs.
"""

from __future__ import annotations

from tenantguard.algorithms._outcome import NEVER, Outcome

__all__ = ["State", "acquire", "expires", "release"]

Lease = tuple[str, float, int]
State = tuple[Lease, ...]


def _live(state: State | None, now: float) -> State:
    if not state:
        return ()
    return tuple(lease for lease in state if lease[1] > now)


def acquire(
    state: State | None, now: float, limit: int, ttl: float, cost: int, lease: str
) -> Outcome:
    live = _live(state, now)
    held = sum(item[2] for item in live)
    if held + cost <= limit:
        new = (*live, (lease, now + ttl, cost))
        return (True, new, limit - held - cost, min(item[1] for item in new), 0.0)
    if cost > limit:
        return (False, state, max(limit - held, 0), now, NEVER)
    # the soonest moment enough leases will have expired, if none is released first
    freed, at = 0, now
    for item in sorted(live, key=lambda item: item[1]):
        freed += item[2]
        at = item[1]
        if held - freed + cost <= limit:
            break
    return (False, state, max(limit - held, 0), at, at - now)


def release(state: State | None, now: float, lease: str) -> State:
    """Drop ``lease`` (and every expired one); releasing twice changes nothing."""
    return tuple(item for item in _live(state, now) if item[0] != lease)


def expires(state: State, window: float) -> float:
    return max((item[1] for item in state), default=0.0)
