"""Rate-limit algorithms as pure functions of (state, now, parameters, cost).

Nothing here reads a clock or touches storage: every store calls these same functions
(the Redis script implements them line for line), so the maths lives in one place.
``STEPS`` maps a policy's algorithm name to its step function for the four windowed
algorithms; concurrency has ``acquire``/``release`` because a lease has an identity.
"""

from collections.abc import Callable
from typing import Any

from tenantguard.algorithms import concurrency, fixed_window, gcra, sliding_window, token_bucket
from tenantguard.algorithms._outcome import EARLY, EPSILON, NEVER, Outcome

__all__ = [
    "EARLY",
    "EPSILON",
    "EXPIRES",
    "NEVER",
    "STEPS",
    "Outcome",
    "Step",
    "concurrency",
    "fixed_window",
    "gcra",
    "sliding_window",
    "token_bucket",
]

Step = Callable[[Any, float, int, float, int, int], Outcome]

STEPS: dict[str, Step] = {
    "fixed-window": fixed_window.step,
    "sliding-window": sliding_window.step,
    "token-bucket": token_bucket.step,
    "gcra": gcra.step,
}

EXPIRES: dict[str, Callable[[Any, float], float]] = {
    "fixed-window": fixed_window.expires,
    "sliding-window": sliding_window.expires,
    "token-bucket": token_bucket.expires,
    "gcra": gcra.expires,
    "concurrency": concurrency.expires,
}
