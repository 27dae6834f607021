"""The one place that says what a rule's limit is for a tenant.

Today that is the plan's value (``burst`` defaulting to the limit); overrides and
contract values plug in here, so every front door and store sees the same number.
"""

from __future__ import annotations

from tenantguard._rules import CompiledRule
from tenantguard.tenants import TenantRecord

__all__ = ["effective_limit"]


def effective_limit(
    rule: CompiledRule, plan_slot: int, record: TenantRecord | None
) -> tuple[int | str, int]:
    """``(value, burst)``: value is a count, ``"unlimited"`` or ``"unavailable"``."""
    value = rule.values[plan_slot]
    burst = rule.bursts[plan_slot]
    if burst is None:
        burst = value if isinstance(value, int) else 0
    return value, burst
