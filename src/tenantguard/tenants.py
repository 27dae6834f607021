"""Tenant records (``guard.tenants``): a plan and metadata per tenant id.

Records live in the ledger. Changing a plan never deletes anything: counters, counts and
overrides stay, and only what the new plan no longer allows is refused from then on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tenantguard.ledger._base import EventRecord, TenantRecord

if TYPE_CHECKING:
    from tenantguard.guard import Guard

__all__ = ["TenantRecord", "Tenants", "UnknownPlanError"]


class UnknownPlanError(ValueError):
    """A tenant was given a plan the policy does not define."""


MAX_TENANT_ID = 1024
"""Characters in a tenant id: a directory entry, a counter key and a ledger key each."""


def check_tenant_id(tenant: object) -> str:
    if not isinstance(tenant, str) or not tenant:
        raise ValueError("tenant id must be a non-empty string")
    if len(tenant) > MAX_TENANT_ID:
        raise ValueError(f"tenant id must be at most {MAX_TENANT_ID} characters")
    return tenant


class Tenants:
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def upsert(
        self, tenant: str, *, plan: str, metadata: Mapping[str, Any] | None = None
    ) -> TenantRecord:
        """Create or change a tenant; ``metadata=None`` keeps what it had."""
        check_tenant_id(tenant)
        guard = self._guard
        known = guard.policy.plan_index
        if plan not in known:
            raise UnknownPlanError(
                f"plan {plan!r} is not in the policy; expected one of: {', '.join(known)}"
            )
        now = guard.now()
        record, before = await guard.ledger.upsert_tenant(tenant, plan, metadata, now)
        await guard.tenant_changed(tenant)
        if before is None or before.plan != plan:
            guard.events.emit(
                EventRecord(
                    tenant, "plan_changed", plan, now,
                    {"from": None if before is None else before.plan, "to": plan},
                )
            )  # fmt: skip
        return record

    async def get(self, tenant: str) -> TenantRecord | None:
        return await self._guard.ledger.get_tenant(tenant)

    async def delete(self, tenant: str) -> bool:
        """Forget the tenant's record (it falls back to the default plan); its counts,
        overrides and history are kept."""
        removed = await self._guard.ledger.delete_tenant(tenant, now=self._guard.now())
        await self._guard.tenant_changed(tenant)
        return removed

    async def list(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]:
        return await self._guard.ledger.list_tenants(prefix=prefix, limit=limit)
