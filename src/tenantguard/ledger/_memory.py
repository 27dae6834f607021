"""The in-process ledger: the embedded default when no ledger URL is given.

It answers exactly as ``SqlLedger`` does (the shared conformance suite holds both to it),
so code tested against it behaves the same on a database. One lock makes every method
atomic; nothing inside it awaits, so holding a thread lock in a coroutine is safe and
also serves a sync facade running on other threads. JSON-valued fields (metadata, event
data) go through the same encoder a database would use, so a value a database would
refuse is refused here too, and what comes back is a copy the caller cannot mutate.
Nothing survives the process: use SQLite or PostgreSQL for anything that must.

The tenant feed is a list of (position, tenant, date) rows behind the same lock, so
positions are gap-free in the order writes happen, as the databases' are in commit
order; purging drops a prefix of it, as ``SqlLedger.purge`` does.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from tenantguard.ledger._base import (
    ChangeResult,
    EventRecord,
    IncreaseRequest,
    OverrideRecord,
    TenantChanges,
    TenantRecord,
    TenantSnapshot,
    UsageChange,
    UsageRow,
    check_feed_arguments,
)
from tenantguard.ledger._schema import frozen_json

__all__ = ["MemoryLedger"]

_UsageKey = tuple[str, str, str, str]


class MemoryLedger:
    """A ``Ledger`` in dicts behind one ``threading.Lock``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._tenants: dict[str, TenantRecord] = {}
        self._overrides: dict[tuple[str, str], OverrideRecord] = {}
        self._usage: dict[_UsageKey, UsageRow] = {}
        self._keys: dict[tuple[str, str], tuple[ChangeResult, float]] = {}
        self._requests: dict[str, IncreaseRequest] = {}
        self._events: dict[str, list[EventRecord]] = {}
        self._last_event_id = 0
        self._feed: deque[tuple[int, str, float]] = deque()  # (seq, tenant, at), by seq
        self._feed_head = 0

    @contextmanager
    def _open(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            yield

    # tenants

    async def upsert_tenant(
        self, tenant: str, plan: str, metadata: Mapping[str, Any] | None, now: float
    ) -> tuple[TenantRecord, TenantRecord | None]:
        with self._open():
            before = self._tenants.get(tenant)
            if before is None:
                record = TenantRecord(tenant, plan, frozen_json(metadata or {}), now, now)
            else:
                kept = before.metadata if metadata is None else frozen_json(metadata)
                record = TenantRecord(tenant, plan, kept, before.created_at, now)
            self._tenants[tenant] = record
            self._changed(tenant, now)
            return record, before

    async def get_tenant(self, tenant: str) -> TenantRecord | None:
        with self._open():
            return self._tenants.get(tenant)

    async def delete_tenant(self, tenant: str, *, now: float | None = None) -> bool:
        with self._open():
            if self._tenants.pop(tenant, None) is None:
                return False
            self._changed(tenant, now)
            return True

    async def list_tenants(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]:
        with self._open():
            chosen = sorted(t for t in self._tenants if t.startswith(prefix))
            return [self._tenants[t] for t in chosen[: max(limit, 0)]]

    # overrides

    async def put_override(self, record: OverrideRecord) -> None:
        with self._open():
            self._overrides[record.tenant, record.name] = record
            self._changed(record.tenant, record.created_at)

    async def delete_override(self, tenant: str, name: str, *, now: float | None = None) -> bool:
        with self._open():
            if self._overrides.pop((tenant, name), None) is None:
                return False
            self._changed(tenant, now)
            return True

    async def overrides(self, tenant: str) -> list[OverrideRecord]:
        with self._open():
            return self._overrides_of(tenant)

    def _overrides_of(self, tenant: str) -> list[OverrideRecord]:
        mine = [r for (owner, _), r in self._overrides.items() if owner == tenant]
        return sorted(mine, key=lambda r: r.name)

    # the tenant feed

    def _changed(self, tenant: str, at: float | None) -> None:
        """Append a feed row; undated, it takes the newest row's date (see ``_base``)."""
        if at is None:
            at = self._feed[-1][2] if self._feed else 0.0
        self._feed_head += 1
        self._feed.append((self._feed_head, tenant, at))

    async def tenant_snapshot(self) -> TenantSnapshot:
        with self._open():
            plans = {t: self._tenants[t].plan for t in sorted(self._tenants)}
            overrides: dict[str, list[OverrideRecord]] = {}
            for (tenant, _), record in sorted(self._overrides.items()):
                overrides.setdefault(tenant, []).append(record)
            return TenantSnapshot(self._feed_head, plans, overrides)

    async def tenant_changes(self, after: int, *, limit: int = 1000) -> TenantChanges:
        check_feed_arguments(after, limit)
        with self._open():
            head = self._feed_head
            oldest = self._feed[0][0] if self._feed else head + 1
            if after > head or after < oldest - 1:
                return TenantChanges(head, {}, {}, complete=False)
            start = after + 1 - oldest
            rows = [self._feed[i] for i in range(start, min(start + limit, len(self._feed)))]
            changed = sorted({tenant for _, tenant, _ in rows})
            plans: dict[str, str | None] = {}
            for tenant in changed:
                record = self._tenants.get(tenant)
                plans[tenant] = None if record is None else record.plan
            overrides = {tenant: self._overrides_of(tenant) for tenant in changed}
            cursor = rows[-1][0] if rows else after
            return TenantChanges(cursor, plans, overrides, complete=True)

    # usage

    async def change_usage(
        self,
        tenant: str,
        changes: Sequence[UsageChange],
        *,
        idempotency_key: str | None,
        now: float,
    ) -> ChangeResult:
        with self._open():
            if idempotency_key is not None:
                stored = self._keys.get((tenant, idempotency_key))
                if stored is not None:
                    return replace(stored[0], replayed=True)
            result = self._apply(tenant, changes, now)
            if idempotency_key is not None:
                self._keys[tenant, idempotency_key] = (result, now)
            return result

    def _apply(self, tenant: str, changes: Sequence[UsageChange], now: float) -> ChangeResult:
        """Stage every change on a copy of the rows it touches; commit only if all fit."""
        staged: dict[_UsageKey, int] = {}
        used: list[int] = []
        for index, change in enumerate(changes):
            key = (tenant, change.quota, change.scope, change.period)
            current = staged[key] if key in staged else self._used(key)
            new = max(current + change.amount, 0)
            if change.amount > 0 and change.limit is not None and new > change.limit:
                now_used = tuple(self._used((tenant, c.quota, c.scope, c.period)) for c in changes)
                return ChangeResult(now_used, refused=index)
            staged[key] = new
            used.append(new)
        for key, value in staged.items():
            self._usage[key] = UsageRow(*key, used=value, updated_at=now)
        return ChangeResult(tuple(used))

    def _used(self, key: _UsageKey) -> int:
        row = self._usage.get(key)
        return 0 if row is None else row.used

    async def set_usage(
        self, tenant: str, quota: str, scope: str, period: str, used: int, now: float
    ) -> None:
        if used < 0:
            raise ValueError(f"usage must be zero or more, not {used}")
        with self._open():
            self._usage[tenant, quota, scope, period] = UsageRow(
                tenant, quota, scope, period, used, now
            )

    async def usage(self, tenant: str, *, quota: str | None = None) -> list[UsageRow]:
        with self._open():
            return [
                row
                for key, row in sorted(self._usage.items())
                if key[0] == tenant and (quota is None or key[1] == quota)
            ]

    # increase requests

    async def add_request(self, request: IncreaseRequest) -> None:
        with self._open():
            if request.id in self._requests:
                raise ValueError(f"increase request {request.id!r} already exists")
            self._requests[request.id] = replace(request, endpoints=tuple(request.endpoints))

    async def get_request(self, request_id: str) -> IncreaseRequest | None:
        with self._open():
            return self._requests.get(request_id)

    async def list_requests(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 1000
    ) -> list[IncreaseRequest]:
        with self._open():
            chosen = [
                r
                for r in self._requests.values()
                if (status is None or r.status == status) and (tenant is None or r.tenant == tenant)
            ]
            chosen.sort(key=lambda r: (r.created_at, r.id))
            return chosen[: max(limit, 0)]

    async def update_request(self, request: IncreaseRequest) -> None:
        with self._open():
            if request.id not in self._requests:
                raise KeyError(f"no increase request {request.id!r}")
            self._requests[request.id] = replace(request, endpoints=tuple(request.endpoints))

    # events

    async def add_events(self, events: Sequence[EventRecord]) -> None:
        frozen = [(event, frozen_json(event.data)) for event in events]  # refuse before adding
        with self._open():
            for event, data in frozen:
                self._last_event_id += 1
                record = replace(event, data=data, id=self._last_event_id)
                self._events.setdefault(event.tenant, []).append(record)

    async def events(
        self,
        tenant: str,
        *,
        since: float | None = None,
        kinds: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        with self._open():
            chosen = [
                e
                for e in self._events.get(tenant, ())
                if (since is None or e.at >= since) and (kinds is None or e.kind in kinds)
            ]
        chosen.sort(key=lambda e: (e.at, e.id or 0), reverse=True)
        return chosen[: max(limit, 0)]

    async def purge(self, *, events_before: float, keys_before: float) -> int:
        with self._open():
            dropped = 0
            for tenant, kept in list(self._events.items()):
                fresh = [e for e in kept if e.at >= events_before]
                dropped += len(kept) - len(fresh)
                if fresh:
                    self._events[tenant] = fresh
                else:
                    del self._events[tenant]
            stale = [key for key, (_, at) in self._keys.items() if at < keys_before]
            for key in stale:
                del self._keys[key]
            old_rows = 0
            while self._feed and self._feed[0][2] < keys_before:
                self._feed.popleft()
                old_rows += 1
            return dropped + len(stale) + old_rows

    async def ping(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        with self._lock:
            self._closed = True
