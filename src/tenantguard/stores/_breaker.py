"""A circuit breaker, so a dead store costs one timeout, not one timeout per check.

Closed: calls go through. After ``failures`` consecutive failures it opens: calls fail at
once for ``cooldown`` seconds. Then one call is let through as a probe (half-open); its
success closes the breaker, its failure opens it for another cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._probing else "open"

    def allow(self) -> bool:
        """May a call go to the store now? Closed: yes. Open: no, until the cooldown ends.

        Then this call becomes the probe (half-open) and the cooldown restarts, so others
        are refused until the probe reports. A probe that never reports (its task was
        cancelled) would otherwise wedge the breaker half-open for good; here the next
        call after another cooldown simply probes again.
        """
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self.cooldown:
            return False
        self._opened_at = now
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probing = False
