"""Generic cell rate algorithm (GCRA), in its virtual-scheduling form.

Each request of cost ``c`` moves the theoretical arrival time (TAT) ``c × T`` ahead,
with emission interval ``T = window / limit``; a request is admitted while the new TAT
is no more than ``burst × T`` ahead of now. It admits exactly the traffic of a token
bucket with the same capacity and rate (the property tests check that), written in
terms of time rather than tokens; operators who know one name look for that one.

State: ``(ahead, at)``, how far the TAT was ahead of the instant ``at``, so that
``TAT = at + ahead``. Keeping the offset apart from the instant keeps the arithmetic on
small numbers (see ``token_bucket`` for why an absolute TAT would drift).
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
    interval = window / limit
    tolerance = burst * interval
    ahead = state[0] - (now - state[1]) if state is not None else 0.0  # max(TAT, now) - now
    if ahead < 0.0:  # noqa: PLR1730 - max() is a builtin call, and this runs on every check
        ahead = 0.0
    new_ahead = ahead + cost * interval
    if new_ahead <= tolerance + EARLY:
        left = (tolerance - new_ahead) / interval + EPSILON
        return (True, (new_ahead, now), int(left) if left > 0 else 0, now + new_ahead, 0.0)
    retry = NEVER if cost > burst else new_ahead - tolerance
    left = (tolerance - ahead) / interval
    return (False, state, int(left + EPSILON) if left > 0 else 0, now + ahead, retry)


def expires(state: State, window: float) -> float:
    return state[1] + state[0]
