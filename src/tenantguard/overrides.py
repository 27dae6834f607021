"""Per-tenant overrides of one rule or quota (``guard.overrides``).

A value replaces the plan's, a multiplier scales it (DynamicScale-style). A ``hard`` plan
promises fixed caps, so an override that would raise a limit there is refused; ``soft``
plans take them; ``contract`` plans take their values from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tenantguard._effective import _raises
from tenantguard.errors import TenantguardError
from tenantguard.ledger._base import EventRecord, OverrideRecord

if TYPE_CHECKING:
    from tenantguard.guard import Guard

__all__ = ["OverrideRefused", "Overrides", "UnknownLimitError"]


class OverrideRefused(TenantguardError, ValueError):
    """The override breaks the plan's promise (raising a hard plan's limit)."""


class UnknownLimitError(TenantguardError, KeyError):
    """No rate rule or quota of that name in the policy."""

    def __str__(self) -> str:
        return str(self.args[0])


def plan_value(guard: Guard, name: str, slot: int) -> int | str:
    """The plan's value of the rule or quota ``name``; ``UnknownLimitError`` if none."""
    policy = guard.policy
    if name in policy.rules_by_name:
        return policy.rules_by_name[name].values[slot]
    if name in policy.quotas:
        return policy.quotas[name].values[slot]
    names = ", ".join([*policy.rules_by_name, *policy.quotas])
    raise UnknownLimitError(f"no rate limit or quota {name!r} in the policy; known: {names}")


class Overrides:
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def set(
        self,
        tenant: str,
        name: str,
        *,
        value: int | None = None,
        multiplier: float | None = None,
        reason: str,
        expires_at: float | None = None,
        actor: str = "admin",
    ) -> OverrideRecord:
        if (value is None) == (multiplier is None):
            raise ValueError("give exactly one of value or multiplier")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"value must be a whole number >= 0, got {value!r}")
        if multiplier is not None and not multiplier > 0:
            raise ValueError(f"multiplier must be above 0, got {multiplier!r}")
        if not reason or not reason.strip():
            raise ValueError("an override needs a reason")
        guard = self._guard
        now = guard.now()
        if expires_at is not None and expires_at <= now:
            raise ValueError("expires_at is in the past")
        state = await guard.tenant_state(tenant)
        base = plan_value(guard, name, state.slot)
        if state.enforcement == "hard":
            after: int | str = (
                value
                if value is not None
                else (int(base * (multiplier or 1.0)) if isinstance(base, int) else base)
            )
            if _raises(base, after):
                raise OverrideRefused(
                    f"plan {state.plan!r} is a hard plan: its limits are fixed, so {name!r} "
                    f"cannot go from {base} to {after}; upgrade the plan instead"
                )
        record = OverrideRecord(
            tenant, name, value, multiplier, reason.strip(), expires_at, actor, now
        )
        await guard.ledger.put_override(record)
        await guard.tenant_changed(tenant)
        guard.events.emit(
            EventRecord(
                tenant, "override_set", name, now,
                {"value": value, "multiplier": multiplier, "reason": record.reason,
                 "expires_at": expires_at, "by": actor},
            )
        )  # fmt: skip
        return record

    async def remove(self, tenant: str, name: str, *, actor: str = "admin") -> bool:
        guard = self._guard
        removed = await guard.ledger.delete_override(tenant, name, now=guard.now())
        if removed:
            await guard.tenant_changed(tenant)
            guard.events.emit(
                EventRecord(tenant, "override_removed", name, guard.now(), {"by": actor})
            )
        return removed

    async def list(self, tenant: str) -> list[OverrideRecord]:
        return await self._guard.ledger.overrides(tenant)
