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
    "TenantChanges",
    "TenantRecord",
    "TenantSnapshot",
    "UsageChange",
    "UsageRow",
    "check_feed_arguments",
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


@dataclass(frozen=True, slots=True)
class TenantSnapshot:
    """Every tenant's plan and overrides, as of at least feed position ``cursor``.

    It may already hold changes made after ``cursor`` (a database reads the cursor
    before the data): following it with ``tenant_changes(cursor)`` replays them, and a
    replay is harmless because a change only says "read this tenant again".
    ``overrides`` holds the tenants that have any, with or without a record, expired
    ones included: whether one still applies is the engine's clock's business.
    """

    cursor: int
    plans: dict[str, str]
    overrides: dict[str, list[OverrideRecord]]


@dataclass(frozen=True, slots=True)
class TenantChanges:
    """The tenants changed after a feed position, each with its whole state now.

    ``plans`` and ``overrides`` have the same keys: each tenant changed since ``after``
    maps to its plan (``None``: no record any more) and to all its overrides (``[]``:
    none). Pass ``cursor`` as ``after`` next time; it moved past at most ``limit`` feed
    rows, so a caller repeats until it stops moving. ``complete`` is false when the
    feed cannot say what changed since ``after`` (purged past it, or ``after`` is ahead
    of the feed, as when the database was replaced): the maps are empty, ``cursor`` is
    the feed's head, and the caller must take a new ``tenant_snapshot``.
    """

    cursor: int
    plans: dict[str, str | None]
    overrides: dict[str, list[OverrideRecord]]
    complete: bool


def check_feed_arguments(after: int, limit: int) -> None:
    """Refuse a position no answer hands out, and a limit that could never move on."""
    if after < 0:
        raise ValueError(f"after must be a cursor the feed gave, 0 or more, not {after}")
    if limit < 1:
        raise ValueError(f"limit must be 1 or more, not {limit}")


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

    async def delete_tenant(self, tenant: str, *, now: float | None = None) -> bool:
        """Removes the tenant record only: counts, overrides and history stay.

        ``now`` dates the change in the tenant feed, for ``purge``; without it the change
        takes the date of the feed's newest row (the ledger reads no clock), and may
        then be purged early: a poller that had not read it yet takes a snapshot."""
        ...

    async def list_tenants(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]: ...

    # overrides
    async def put_override(self, record: OverrideRecord) -> None: ...

    async def delete_override(self, tenant: str, name: str, *, now: float | None = None) -> bool:
        """``now`` dates the change in the tenant feed, as for ``delete_tenant``."""
        ...

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

    # the tenant feed

    async def tenant_snapshot(self) -> TenantSnapshot:
        """Every tenant's state and the feed position it is consistent with, read in
        one transaction."""
        ...

    async def tenant_changes(self, after: int, *, limit: int = 1000) -> TenantChanges:
        """The state now of every tenant with a feed row after position ``after``.

        Each write to a tenant's record or overrides appends one feed row in its own
        transaction; positions are gap-free in commit order, so a poller that saw
        position ``n`` has seen every change committed before it. ``after`` is a
        ``cursor`` from an earlier answer (0 for a fresh database); ``limit`` (at least
        1) bounds the feed rows one call reads."""
        ...

    async def purge(self, *, events_before: float, keys_before: float) -> int:
        """Drop events older than ``events_before``; idempotency keys and tenant feed
        rows older than ``keys_before``. Returns how many rows went.

        Feed rows go oldest first and only up to the first one still young, so what
        stays is always a gap-free run up to the head (a row's date comes from the
        writer's clock, which need not rise with its position); a poller whose cursor
        is older than what stays is told to take a snapshot."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
