"""Entity caps and usage quotas (``guard.quotas``).

An entity cap counts things a tenant has (applications, roles, users per organization);
a usage quota counts consumption per UTC calendar period (access tokens per month). Both
are ledger counters changed only by conditional atomic updates, so they are exact under
any number of concurrent acquirers, and a retried call with the same idempotency key
counts once. Over a cap: ``QuotaExceeded``, which says what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tenantguard._effective import UNAVAILABLE, effective_value
from tenantguard._periods import current_period
from tenantguard._rules import CompiledQuota
from tenantguard.errors import TenantguardError
from tenantguard.ledger._base import EventRecord, UsageChange

if TYPE_CHECKING:
    from tenantguard.guard import Guard, TenantState

__all__ = ["QuotaExceeded", "Quotas", "UnknownQuotaError", "Usage"]


class UnknownQuotaError(TenantguardError, KeyError):
    """The policy has no quota of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class Usage:
    """A quota's count for a tenant (and scope) after an operation.

    ``limit`` and ``remaining`` are ``None`` for an unlimited quota. ``resets_at`` is the
    end of the current period for a usage quota.
    """

    quota: str
    scope: str | None
    used: int
    limit: int | None
    remaining: int | None
    period: str | None
    resets_at: float | None
    source: str


class QuotaExceeded(TenantguardError):
    """An acquisition would cross a cap; nothing was counted and nothing deleted.

    ``status`` is 403 for an entity cap (``code`` ``quota_exceeded``) and 429 for a
    usage quota (``usage_exceeded``); the message says why and what to do.
    """

    def __init__(
        self,
        *,
        tenant: str,
        quota: str,
        limit: int | None,
        used: int,
        requested: int,
        plan: str,
        enforcement: str,
        period: str | None = None,
        resets_at: float | None = None,
    ) -> None:
        self.tenant = tenant
        self.quota = quota
        self.limit = limit
        self.used = used
        self.requested = requested
        self.plan = plan
        self.resets_at = resets_at
        self.usage_quota = period is not None
        self.status = 429 if self.usage_quota else 403
        self.code = "usage_exceeded" if self.usage_quota else "quota_exceeded"
        if limit is None:
            why = f"{quota} is not available on plan {plan!r}"
        elif used > limit:
            why = (
                f"{quota}: {used} in use but plan {plan!r} allows {limit} (the limit was "
                "lowered or the plan changed); nothing was removed, but new ones are refused "
                "until usage is below the limit"
            )
        else:
            per = f" this {period}" if period else ""
            why = f"{quota}: {used} of {limit} used{per}, {requested} more requested"
        if enforcement == "hard":
            advice = "this plan's limits are fixed: upgrade the plan for more"
        elif enforcement == "contract":
            advice = "the contract sets this limit: request an increase to change it"
        else:
            advice = "request an increase, or upgrade the plan"
        if resets_at is not None:
            when = datetime.fromtimestamp(resets_at, UTC).isoformat().replace("+00:00", "Z")
            advice += f"; usage resets at {when}"
        self.advice = advice
        super().__init__(f"{why}. {advice[0].upper()}{advice[1:]}")


def _amount(amount: object) -> int:
    """A positive whole number: a negative acquire must not turn into a release."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise ValueError(f"amount must be a whole number >= 1, got {amount!r}")
    return amount


class Quotas:
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    def _quota(self, name: str) -> CompiledQuota:
        try:
            return self._guard.policy.quotas[name]
        except KeyError:
            known = ", ".join(self._guard.policy.quotas) or "none"
            raise UnknownQuotaError(f"no quota {name!r} in the policy; quotas: {known}") from None

    @staticmethod
    def _scope(quota: CompiledQuota, scope: str | None) -> str:
        if quota.per is not None and not scope:
            raise ValueError(f"quota {quota.name!r} is counted per {quota.per}: give its scope")
        if quota.per is None and scope:
            raise ValueError(f"quota {quota.name!r} has no sub-scope; scope must be empty")
        return scope or ""

    def _limit(self, state: TenantState, name: str, now: float) -> tuple[int | str, str]:
        quota = self._guard.policy.quotas[name]
        return effective_value(
            quota.values[state.slot], state.enforcement, state.overrides.get(name), now
        )

    def _changes(
        self, state: TenantState, quota: CompiledQuota, scope: str, amount: int, now: float
    ) -> list[UsageChange]:
        """The quota and everything it counts toward, as one all-or-nothing change."""
        changes = []
        for name in (quota.name, *quota.counts_toward):
            target = self._guard.policy.quotas[name]
            value, _ = self._limit(state, name, now)
            if value == UNAVAILABLE and amount > 0:
                self._guard.events.emit(
                    EventRecord(state.tenant, "quota_exceeded", name, now,
                                {"limit": None, "requested": amount, "unavailable": True})
                )  # fmt: skip
                raise QuotaExceeded(
                    tenant=state.tenant, quota=name, limit=None, used=0, requested=amount,
                    plan=state.plan, enforcement=state.enforcement,
                )  # fmt: skip
            limit = value if isinstance(value, int) and amount > 0 else None
            target_scope = scope if target.per == quota.per else ""
            period, _ = current_period(target.period, now)
            changes.append(UsageChange(name, target_scope, period, amount, limit))
        return changes

    async def acquire(
        self,
        tenant: str,
        quota: str,
        amount: int = 1,
        *,
        scope: str | None = None,
        idempotency_key: str | None = None,
    ) -> Usage:
        """Take ``amount`` of ``quota`` (and of every quota it counts toward), or raise
        ``QuotaExceeded`` having taken nothing."""
        return await self._change(tenant, quota, _amount(amount), scope, idempotency_key)

    async def release(
        self,
        tenant: str,
        quota: str,
        amount: int = 1,
        *,
        scope: str | None = None,
        idempotency_key: str | None = None,
    ) -> Usage:
        """Give back ``amount`` (never below zero); always allowed, even over a cap."""
        return await self._change(tenant, quota, -_amount(amount), scope, idempotency_key)

    async def _change(
        self, tenant: str, name: str, amount: int, scope: str | None, key: str | None
    ) -> Usage:
        quota = self._quota(name)
        where = self._scope(quota, scope)
        guard = self._guard
        now = guard.now()
        state = await guard.tenant_state(tenant)
        changes = self._changes(state, quota, where, amount, now)
        result = await guard.ledger.change_usage(tenant, changes, idempotency_key=key, now=now)
        if result.refused is not None:
            refused = changes[result.refused]
            target = guard.policy.quotas[refused.quota]
            _, resets_at = current_period(target.period, now)
            guard.events.emit(
                EventRecord(
                    tenant, "quota_exceeded", refused.quota, now,
                    {"limit": refused.limit, "used": result.used[result.refused],
                     "requested": amount, "scope": refused.scope or None},
                )
            )  # fmt: skip
            raise QuotaExceeded(
                tenant=tenant, quota=refused.quota, limit=refused.limit,
                used=result.used[result.refused], requested=amount, plan=state.plan,
                enforcement=state.enforcement, period=target.period, resets_at=resets_at,
            )  # fmt: skip
        return self._usage(state, quota, scope, result.used[0], now)

    async def set_usage(
        self, tenant: str, quota: str, used: int, *, scope: str | None = None
    ) -> Usage:
        """Reconcile with the host's source of truth: the count becomes ``used``.

        Only this quota's row changes; what it counts toward is reconciled separately.
        """
        if isinstance(used, bool) or not isinstance(used, int) or used < 0:
            raise ValueError(f"used must be a whole number >= 0, got {used!r}")
        compiled = self._quota(quota)
        where = self._scope(compiled, scope)
        guard = self._guard
        now = guard.now()
        period, _ = current_period(compiled.period, now)
        await guard.ledger.set_usage(tenant, quota, where, period, used, now)
        return self._usage(await guard.tenant_state(tenant), compiled, scope, used, now)

    async def get(self, tenant: str, quota: str, *, scope: str | None = None) -> Usage:
        compiled = self._quota(quota)
        where = self._scope(compiled, scope)
        guard = self._guard
        now = guard.now()
        period, _ = current_period(compiled.period, now)
        rows = await guard.ledger.usage(tenant, quota=quota)
        used = next((r.used for r in rows if r.scope == where and r.period == period), 0)
        return self._usage(await guard.tenant_state(tenant), compiled, scope, used, now)

    def _usage(
        self, state: TenantState, quota: CompiledQuota, scope: str | None, used: int, now: float
    ) -> Usage:
        value, source = self._limit(state, quota.name, now)
        limit = value if isinstance(value, int) else (0 if value == UNAVAILABLE else None)
        period, resets_at = current_period(quota.period, now)
        return Usage(
            quota=quota.name,
            scope=scope,
            used=used,
            limit=limit,
            remaining=None if limit is None else max(limit - used, 0),
            period=period or None,
            resets_at=resets_at,
            source=source,
        )
