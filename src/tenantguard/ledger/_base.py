"""What the ledger keeps, and the one interface every ledger implements.

The ledger is the durable half of tenantguard's state: tenants, overrides, entity counts,
period usage, idempotency keys, increase requests and events. It knows nothing of
policies; the services above it (``tenantguard.quotas``, ``overrides``, …) decide what a
limit is and hand the ledger conditional changes to apply atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

__all__ = [
    "ChangeResult",
    "EventRecord",
    "IncreaseRequest",
    "Ledger",
    "OverrideRecord",
    "TenantRecord",
    "UsageChange",
    "UsageRow",
]


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant: str
    plan: str
    metadata: Mapping[str, Any] = field(default_factory=_empty)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class OverrideRecord:
    """A tenant's own value for one rule or quota: ``value`` or ``multiplier``, not both.

    It stops applying at ``expires_at`` (epoch seconds, by the guard's clock).
    """

    tenant: str
    name: str
    value: int | None
    multiplier: float | None
    reason: str
    expires_at: float | None
    created_by: str
    created_at: float


@dataclass(frozen=True, slots=True)
class UsageChange:
    """Change one counter by ``amount`` (negative gives back, never below zero).

    ``limit`` is the cap the new value must not exceed (``None``: no cap, e.g. an
    unlimited quota that is still counted). ``scope`` is ``""`` when the quota has no
    sub-scope; ``period`` is ``""`` for entity caps, else the calendar period's key
    (``2026-11``, ``2026-W47``, ``2026-11-22``, ``2026``).
    """

    quota: str
    scope: str
    period: str
    amount: int
    limit: int | None


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """The outcome of ``change_usage``, also what an idempotency key replays.

    ``used`` holds each counter's value after the change, or, when refused, its value
    now. ``refused`` is the index of the first change that would have crossed its
    limit (nothing was applied), else ``None``.
    """

    used: tuple[int, ...]
    refused: int | None = None
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.refused is None


@dataclass(frozen=True, slots=True)
class UsageRow:
    tenant: str
    quota: str
    scope: str
    period: str
    used: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class IncreaseRequest:
    """A tenant's ask for more of one limit, with the facts a reviewer needs."""

    id: str
    tenant: str
    limit: str
    requested: int
    reason: str
    status: str = "pending"  # pending | approved | rejected
    avg_rps: float | None = None
    peak_rps: float | None = None
    burst_pattern: str | None = None
    endpoints: tuple[str, ...] = ()
    needed_by: str | None = None
    created_at: float = 0.0
    decided_at: float | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    approved_value: int | None = None
    approved_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """Something a tenant's operator may want to know happened (DESIGN.md "event")."""

    tenant: str
    kind: str  # warning | violation | quota_exceeded | override_set | override_removed |
    # plan_changed | increase_requested | increase_decided
    name: str  # the rule, quota, plan or request it concerns
    at: float
    data: Mapping[str, Any] = field(default_factory=_empty)
    id: int | None = None


class Ledger(Protocol):
    """Every method is atomic on its own; ``change_usage`` is all-or-nothing."""

    # tenants
    async def upsert_tenant(
        self, tenant: str, plan: str, metadata: Mapping[str, Any] | None, now: float
    ) -> tuple[TenantRecord, TenantRecord | None]:
        """The record now, and the one it replaced (``None`` if new). ``metadata=None``
        keeps what was there."""
        ...

    async def get_tenant(self, tenant: str) -> TenantRecord | None: ...

    async def delete_tenant(self, tenant: str) -> bool:
        """Removes the tenant record only: counts, overrides and history stay."""
        ...

    async def list_tenants(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]: ...

    # overrides
    async def put_override(self, record: OverrideRecord) -> None: ...

    async def delete_override(self, tenant: str, name: str) -> bool: ...

    async def overrides(self, tenant: str) -> list[OverrideRecord]: ...

    # usage
    async def change_usage(
        self,
        tenant: str,
        changes: Sequence[UsageChange],
        *,
        idempotency_key: str | None,
        now: float,
    ) -> ChangeResult:
        """Apply every change or none. Each is a conditional update
        (``used + amount <= limit``), correct under concurrent callers. A repeated
        ``idempotency_key`` (per tenant) returns the first result with ``replayed``."""
        ...

    async def set_usage(
        self, tenant: str, quota: str, scope: str, period: str, used: int, now: float
    ) -> None: ...

    async def usage(self, tenant: str, *, quota: str | None = None) -> list[UsageRow]: ...

    # increase requests
    async def add_request(self, request: IncreaseRequest) -> None: ...

    async def get_request(self, request_id: str) -> IncreaseRequest | None: ...

    async def list_requests(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 1000
    ) -> list[IncreaseRequest]: ...

    async def update_request(self, request: IncreaseRequest) -> None: ...

    # events
    async def add_events(self, events: Sequence[EventRecord]) -> None: ...

    async def events(
        self,
        tenant: str,
        *,
        since: float | None = None,
        kinds: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[EventRecord]: ...

    async def purge(self, *, events_before: float, keys_before: float) -> int:
        """Drop events and idempotency keys older than the given instants."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
