"""Tenant records and the interface a ledger implements to keep them.

The in-memory ``MemoryTenants`` is the embedded implementation; the durable ledger
(SQLite, PostgreSQL) implements the same ``TenantRecords`` protocol. ``peek`` is the
synchronous read the hot path uses: the in-memory store answers it directly, a durable
store answers from its bounded in-process cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

__all__ = ["MemoryTenants", "TenantRecord", "TenantRecords", "UnknownPlanError"]


class UnknownPlanError(ValueError):
    """A tenant was given a plan the policy does not define."""


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant: str
    plan: str
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    created_at: float = 0.0
    updated_at: float = 0.0


class TenantRecords(Protocol):
    async def upsert(
        self, tenant: str, *, plan: str, metadata: Mapping[str, Any] | None = None
    ) -> TenantRecord: ...

    async def get(self, tenant: str) -> TenantRecord | None: ...

    async def delete(self, tenant: str) -> bool: ...

    async def list(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]: ...

    def peek(self, tenant: str) -> TenantRecord | None: ...


class MemoryTenants:
    """Tenant records in a dict. ``plans`` validates plan names; ``clock`` stamps times."""

    def __init__(self, plans: Callable[[], set[str]], clock: Callable[[], float]) -> None:
        self._records: dict[str, TenantRecord] = {}
        self._plans = plans
        self._clock = clock
        self._lock = threading.Lock()

    def _validate(self, tenant: str, plan: str) -> None:
        if not isinstance(tenant, str) or not tenant:
            raise ValueError("tenant id must be a non-empty string")
        known = self._plans()
        if plan not in known:
            raise UnknownPlanError(
                f"plan {plan!r} is not in the policy; expected one of: {', '.join(sorted(known))}"
            )

    async def upsert(
        self, tenant: str, *, plan: str, metadata: Mapping[str, Any] | None = None
    ) -> TenantRecord:
        """Create or change a tenant. Changing the plan keeps every counter and count."""
        self._validate(tenant, plan)
        now = self._clock()
        with self._lock:
            old = self._records.get(tenant)
            meta = MappingProxyType(dict(metadata)) if metadata is not None else None
            if old is None:
                record = TenantRecord(tenant, plan, meta or MappingProxyType({}), now, now)
            else:
                record = replace(
                    old,
                    plan=plan,
                    metadata=meta if meta is not None else old.metadata,
                    updated_at=now,
                )
            self._records[tenant] = record
            return record

    async def get(self, tenant: str) -> TenantRecord | None:
        return self._records.get(tenant)

    async def delete(self, tenant: str) -> bool:
        with self._lock:
            return self._records.pop(tenant, None) is not None

    async def list(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]:
        records = sorted(
            (record for record in self._records.values() if record.tenant.startswith(prefix)),
            key=lambda record: record.tenant,
        )
        return records[:limit]

    def peek(self, tenant: str) -> TenantRecord | None:
        return self._records.get(tenant)
