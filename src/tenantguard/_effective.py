"""The one place that says what a limit is for a tenant, and where the number came from.

Rate rules and quotas alike: the plan's value, unless the tenant has an override that
has not expired. Overrides on a ``hard`` plan can only lower a value (the plan promises
fixed caps); on a ``contract`` plan the plan's value is only the fallback for limits the
contract does not set, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping

from tenantguard._rules import CompiledRule
from tenantguard.ledger._base import OverrideRecord

__all__ = ["effective_limit", "effective_value"]

UNLIMITED = "unlimited"
UNAVAILABLE = "unavailable"


def effective_value(
    plan_value: int | str,
    enforcement: str,
    override: OverrideRecord | None,
    now: float,
) -> tuple[int | str, str]:
    """``(value, source)``; source is ``plan``, ``override`` or ``contract-default``."""
    if override is not None and (override.expires_at is None or override.expires_at > now):
        if override.value is not None:
            value: int | str = override.value
        elif plan_value in (UNLIMITED, UNAVAILABLE) or not isinstance(plan_value, int):
            value = plan_value
        else:
            value = int(plan_value * (override.multiplier or 1.0))
        if enforcement != "hard" or not _raises(plan_value, value):
            return value, "override"
    return plan_value, "contract-default" if enforcement == "contract" else "plan"


def _raises(before: int | str, after: int | str) -> bool:
    if before == UNLIMITED or after == UNAVAILABLE:
        return False
    if before == UNAVAILABLE or after == UNLIMITED:
        return True
    return int(after) > int(before)


def effective_limit(
    rule: CompiledRule,
    slot: int,
    enforcement: str,
    overrides: Mapping[str, OverrideRecord] | None,
    now: float,
) -> tuple[int | str, int]:
    """``(value, burst)`` of a rate rule; an overridden limit scales its burst alike."""
    plan_value = rule.values[slot]
    value = plan_value
    if overrides:
        value, _ = effective_value(plan_value, enforcement, overrides.get(rule.name), now)
    burst = rule.bursts[slot]
    if not isinstance(value, int):
        return value, 0
    if burst is None:
        return value, value
    if isinstance(plan_value, int) and plan_value > 0 and value != plan_value:
        return value, max(1, burst * value // plan_value)
    return value, burst
