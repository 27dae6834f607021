"""The answer to a check: what to do with the request, and what to tell the client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from tenantguard._headers import HeaderStyle, render_headers

__all__ = ["Decision", "RuleCheck"]


class RuleCheck(NamedTuple):
    """One rule's part in a decision.

    ``outcome`` is ``allowed``; ``denied``; ``uncounted`` (this rule would have admitted
    the request but another denied it, so nothing was counted); ``shadow-denied`` (a
    shadow rule that would have denied); ``unlimited`` or ``unavailable`` (no counter
    touched, ``limit`` is ``None``).
    """

    rule: str
    group: str
    algorithm: str
    outcome: str
    limit: int | None
    remaining: int | None
    reset: float | None
    retry_after: float | None
    window: float
    shadow: bool
    reason: str | None

    @property
    def allowed(self) -> bool:
        return self.outcome not in ("denied", "unavailable")


class Decision:
    """Allowed or not, and the binding rule (the most restrictive outcome) with its limit.

    ``reset`` is epoch seconds, rounded up; ``retry_after`` whole seconds, rounded up
    (``None`` when allowed, or when the request can never pass because its cost exceeds
    what the rule admits; ``reason`` then says so). ``checks`` and ``headers`` are built
    on first access: a caller that only reads ``allowed`` pays for nothing else.
    """

    __slots__ = (
        "_build_checks",
        "_checks",
        "_headers",
        "_reset",
        "_styles",
        "degraded",
        "lease",
        "limit",
        "now",
        "plan",
        "reason",
        "remaining",
        "retry_after",
        "rule",
        "status",
        "tenant",
    )

    def __init__(
        self,
        tenant: str,
        plan: str,
        status: int,
        rule: str | None,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        retry_after: int | None,
        lease: str | None,
        reason: str | None,
        styles: tuple[HeaderStyle, ...],
        now: float,
        checks: Any,
        build_checks: Callable[[Any], tuple[RuleCheck, ...]] | None = None,
        degraded: bool = False,
    ) -> None:
        # a check builds one of these per request: set only what is cheap, derive the rest
        self.tenant = tenant
        self.plan = plan
        self.status = status
        self.rule = rule
        self.limit = limit
        self.remaining = remaining
        self._reset = reset
        self.retry_after = retry_after
        self.lease = lease
        self.reason = reason
        self.degraded = degraded
        self.now = now
        self._styles = styles
        # ``checks`` is the finished tuple, or what ``build_checks`` makes it from
        self._checks = checks
        self._build_checks = build_checks

    @property
    def allowed(self) -> bool:
        return self.status == 200

    @property
    def reset(self) -> int | None:
        """Epoch second at which the binding rule is whole again, rounded up."""
        reset = self._reset
        return None if reset is None else -int(-reset // 1)

    @property
    def checks(self) -> tuple[RuleCheck, ...]:
        """Every rule that matched, counted or not, in group order."""
        if self._build_checks is not None:
            self._checks = self._build_checks(self._checks)
            self._build_checks = None
        checks: tuple[RuleCheck, ...] = self._checks
        return checks

    @property
    def binding(self) -> RuleCheck | None:
        """The check of the rule that decided (``rule``), if any."""
        for check in self.checks:
            if check.rule == self.rule:
                return check
        return None

    @property
    def headers(self) -> dict[str, str]:
        """Response headers in every style the policy names, rendered once."""
        try:
            return self._headers
        except AttributeError:
            self._headers: dict[str, str] = render_headers(self._styles, self)
            return self._headers

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``POST /v1/check`` (DESIGN.md)."""
        return {
            "allowed": self.allowed,
            "status": self.status,
            "tenant": self.tenant,
            "plan": self.plan,
            "rule": self.rule,
            "limit": self.limit,
            "remaining": self.remaining,
            "reset": self.reset,
            "retry_after": self.retry_after,
            "reason": self.reason,
            "degraded": self.degraded,
            "headers": self.headers,
            "checks": [
                {
                    "rule": check.rule,
                    "group": check.group,
                    "algorithm": check.algorithm,
                    "outcome": check.outcome,
                    "limit": check.limit,
                    "remaining": check.remaining,
                    "reset": None if check.reset is None else -int(-check.reset // 1),
                    "shadow": check.shadow,
                    "reason": check.reason,
                }
                for check in self.checks
            ],
            "lease": self.lease,
        }

    def __repr__(self) -> str:
        return (
            f"Decision(status={self.status}, tenant={self.tenant!r}, rule={self.rule!r}, "
            f"limit={self.limit}, remaining={self.remaining}, reset={self.reset}, "
            f"retry_after={self.retry_after})"
        )
