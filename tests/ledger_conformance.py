"""Store-agnostic ledger scenarios: what every ``Ledger`` must answer.

Each scenario is an async function of a fresh, empty ledger and drives it only through
the ``Ledger`` protocol, so the same scenarios hold the in-memory ledger, SQLite and
PostgreSQL to one behaviour (``test_ledger.py`` holds the table of backends). Time is
always an explicit ``now`` relative to ``T``; nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from tenantguard.ledger import (
    ChangeResult,
    EventRecord,
    IncreaseRequest,
    Ledger,
    OverrideRecord,
    TenantChanges,
    TenantRecord,
    TenantSnapshot,
    UsageChange,
    UsageRow,
)

__all__ = ["SCENARIOS", "Scenario", "T"]

T = 1_700_000_000.0
"""An instant in epoch seconds; every ``now`` below is ``T`` plus a few seconds."""

Scenario = Callable[[Ledger], Awaitable[None]]


def change(
    quota: str, amount: int = 1, limit: int | None = None, *, scope: str = "", period: str = ""
) -> UsageChange:
    return UsageChange(quota, scope, period, amount, limit)


async def acquire(
    ledger: Ledger,
    *changes: UsageChange,
    tenant: str = "acme",
    key: str | None = None,
    now: float = T,
) -> ChangeResult:
    return await ledger.change_usage(tenant, changes, idempotency_key=key, now=now)


async def used(ledger: Ledger, tenant: str = "acme") -> dict[tuple[str, str, str], int]:
    """Every counter of a tenant: (quota, scope, period) → used."""
    return {(r.quota, r.scope, r.period): r.used for r in await ledger.usage(tenant)}


# --- tenants ----------------------------------------------------------------------------


async def tenants_upsert_get_delete(ledger: Ledger) -> None:
    """A new tenant has no predecessor; an update returns the record it replaced, keeps
    ``created_at`` and, with ``metadata=None``, the metadata."""
    record, before = await ledger.upsert_tenant("acme", "free", {"region": "eu"}, T)
    assert before is None
    assert record == TenantRecord("acme", "free", {"region": "eu"}, T, T)
    assert await ledger.get_tenant("acme") == record

    updated, before = await ledger.upsert_tenant("acme", "pro", None, T + 5)
    assert before == record
    assert updated == TenantRecord("acme", "pro", {"region": "eu"}, T, T + 5)
    cleared, _ = await ledger.upsert_tenant("acme", "pro", {}, T + 6)
    assert cleared.metadata == {}
    assert await ledger.get_tenant("acme") == cleared

    fresh, _ = await ledger.upsert_tenant("globex", "free", None, T)
    assert fresh.metadata == {}
    assert await ledger.delete_tenant("acme") is True
    assert await ledger.delete_tenant("acme") is False
    assert await ledger.get_tenant("acme") is None
    assert await ledger.get_tenant("globex") == fresh


async def tenants_plan_change_keeps_usage(ledger: Ledger) -> None:
    """Changing the plan, or deleting the record, leaves counts and overrides alone."""
    await ledger.upsert_tenant("acme", "free", None, T)
    await acquire(ledger, change("apps", 3, 10))
    override = OverrideRecord("acme", "apps", 50, None, "contract", None, "ops", T)
    await ledger.put_override(override)
    await ledger.upsert_tenant("acme", "pro", None, T + 1)
    assert await used(ledger) == {("apps", "", ""): 3}
    assert await ledger.overrides("acme") == [override]
    await ledger.delete_tenant("acme")
    assert await used(ledger) == {("apps", "", ""): 3}
    assert await ledger.overrides("acme") == [override]


async def tenants_list_prefix_limit_order(ledger: Ledger) -> None:
    """Listed in code-point order; the prefix is literal and case-sensitive."""
    ids = ["b", "acme-2", "Acme", "acme", "acm%", "acme_x", "acmé", "a"]
    for tenant in ids:
        await ledger.upsert_tenant(tenant, "free", None, T)
    names = [r.tenant for r in await ledger.list_tenants()]
    assert names == sorted(ids)
    assert [r.tenant for r in await ledger.list_tenants(prefix="acme")] == [
        "acme",
        "acme-2",
        "acme_x",
    ]
    assert [r.tenant for r in await ledger.list_tenants(prefix="acm%")] == ["acm%"]
    assert [r.tenant for r in await ledger.list_tenants(prefix="acm_")] == []
    assert [r.tenant for r in await ledger.list_tenants(prefix="acmé")] == ["acmé"]
    assert [r.tenant for r in await ledger.list_tenants(limit=3)] == sorted(ids)[:3]
    assert await ledger.list_tenants(prefix="acme", limit=0) == []
    assert await ledger.list_tenants(prefix="zzz") == []


async def tenants_metadata_is_json(ledger: Ledger) -> None:
    """Metadata comes back as JSON would give it back (tuples as lists), read-only; what
    JSON cannot hold is refused before anything is stored."""
    metadata = {"tags": ("a", "b"), "nested": {"n": 1, "f": 0.1}, "none": None}
    record, _ = await ledger.upsert_tenant("acme", "free", metadata, T)
    want = {"tags": ["a", "b"], "nested": {"n": 1, "f": 0.1}, "none": None}
    assert record.metadata == want
    stored = await ledger.get_tenant("acme")
    assert stored is not None
    assert stored.metadata == want
    with pytest.raises(TypeError):
        stored.metadata["tags"] = []  # type: ignore[index]
    with pytest.raises(ValueError, match="JSON"):
        await ledger.upsert_tenant("acme", "pro", {"bad": float("nan")}, T + 1)
    with pytest.raises(TypeError):
        await ledger.upsert_tenant("acme", "pro", {"bad": object()}, T + 1)
    assert await ledger.get_tenant("acme") == stored


# --- overrides --------------------------------------------------------------------------


async def overrides_put_replace_delete_list(ledger: Ledger) -> None:
    """One override per (tenant, name), replaced whole; listed by name; per tenant."""
    by_value = OverrideRecord("acme", "apps", 500, None, "launch", T + 3600, "alice", T)
    by_multiplier = OverrideRecord("acme", "access-tokens", None, 2.5, "peak", None, "bob", T)
    other = OverrideRecord("globex", "apps", 7, None, "trial", None, "carol", T)
    for record in (by_value, by_multiplier, other):
        await ledger.put_override(record)
    assert await ledger.overrides("acme") == [by_multiplier, by_value]
    assert await ledger.overrides("globex") == [other]
    assert await ledger.overrides("initech") == []

    replaced = OverrideRecord("acme", "apps", None, 5.0, "renewal", None, "dave", T + 10)
    await ledger.put_override(replaced)
    assert await ledger.overrides("acme") == [by_multiplier, replaced]

    assert await ledger.delete_override("acme", "apps") is True
    assert await ledger.delete_override("acme", "apps") is False
    assert await ledger.delete_override("initech", "apps") is False
    assert await ledger.overrides("acme") == [by_multiplier]
    assert await ledger.overrides("globex") == [other]


# --- change_usage -----------------------------------------------------------------------


async def usage_cap_exactly_reached(ledger: Ledger) -> None:
    """``used + amount == limit`` fits; one more is refused with the value as it is."""
    assert await acquire(ledger, change("apps", 3, 5)) == ChangeResult((3,))
    assert await acquire(ledger, change("apps", 2, 5)) == ChangeResult((5,))
    assert await acquire(ledger, change("apps", 1, 5)) == ChangeResult((5,), refused=0)
    assert await acquire(ledger, change("apps", 6, 5)) == ChangeResult((5,), refused=0)
    assert await acquire(ledger, change("fresh", 6, 5)) == ChangeResult((0,), refused=0)
    assert await used(ledger) == {("apps", "", ""): 5}
    assert await acquire(ledger, change("zero", 1, 0)) == ChangeResult((0,), refused=0)


async def usage_all_or_nothing(ledger: Ledger) -> None:
    """One refusal applies nothing, creates no rows, and reports every counter's value."""
    await acquire(ledger, change("apps", 2, 10), change("m2m", 4, 5))
    result = await acquire(ledger, change("apps", 1, 10), change("m2m", 2, 5), change("new", 1))
    assert result == ChangeResult((2, 4, 0), refused=1)
    assert not result.ok
    assert await used(ledger) == {("apps", "", ""): 2, ("m2m", "", ""): 4}
    ok = await acquire(ledger, change("apps", 1, 10), change("m2m", 1, 5), change("new", 1))
    assert ok == ChangeResult((3, 5, 1))
    assert ok.ok


async def usage_refused_index_is_the_first(ledger: Ledger) -> None:
    """``refused`` is the lowest index that does not fit, whatever order the counters
    sort in."""
    await acquire(ledger, change("alpha", 5), change("zeta", 5))
    both = await acquire(ledger, change("zeta", 1, 5), change("alpha", 1, 5))
    assert both == ChangeResult((5, 5), refused=0)
    second = await acquire(ledger, change("zeta", 1, 9), change("alpha", 1, 5))
    assert second == ChangeResult((5, 5), refused=1)
    third = await acquire(ledger, change("zeta", 1, 9), change("beta", 1), change("alpha", 1, 5))
    assert third == ChangeResult((5, 0, 5), refused=2)
    assert await used(ledger) == {("alpha", "", ""): 5, ("zeta", "", ""): 5}


async def usage_same_counter_twice(ledger: Ledger) -> None:
    """Changes to one counter apply in turn; each reports the value after itself."""
    assert await acquire(ledger, change("apps", 2, 5), change("apps", 2, 5)) == ChangeResult((2, 4))
    refused = await acquire(ledger, change("apps", 1, 5), change("apps", 1, 5))
    assert refused == ChangeResult((4, 4), refused=1)
    assert await used(ledger) == {("apps", "", ""): 4}
    assert await acquire(ledger, change("apps", -3), change("apps", 4, 5)) == ChangeResult((1, 5))


async def usage_negative_floors_at_zero(ledger: Ledger) -> None:
    """Giving back never goes below zero and is never refused, even above a lowered cap."""
    await acquire(ledger, change("apps", 3, 10))
    assert await acquire(ledger, change("apps", -5, 10)) == ChangeResult((0,))
    assert await acquire(ledger, change("never-acquired", -2, 10)) == ChangeResult((0,))
    await acquire(ledger, change("apps", 5, 10))
    assert await acquire(ledger, change("apps", -1, 2)) == ChangeResult((4,))
    assert await acquire(ledger, change("apps", 0, 2)) == ChangeResult((4,))
    assert await used(ledger) == {("apps", "", ""): 4, ("never-acquired", "", ""): 0}


async def usage_without_limit(ledger: Ledger) -> None:
    """``limit=None`` counts without a cap."""
    assert await acquire(ledger, change("tokens", 10**12)) == ChangeResult((10**12,))
    assert await acquire(ledger, change("tokens", 10**12)) == ChangeResult((2 * 10**12,))
    assert await acquire(ledger, change("tokens", -(10**12))) == ChangeResult((10**12,))


async def usage_scopes_periods_tenants_independent(ledger: Ledger) -> None:
    """Each (tenant, quota, scope, period) is its own counter."""
    counters = [
        change("members", 2, 2, scope="org-1"),
        change("members", 2, 2, scope="org-2"),
        change("tokens", 2, 2, period="2026-11"),
        change("tokens", 2, 2, period="2026-12"),
        change("tokens", 2, 2),
    ]
    for counter in counters:
        assert await acquire(ledger, counter) == ChangeResult((2,))
        assert await acquire(ledger, counter, tenant="globex") == ChangeResult((2,))
        assert await acquire(ledger, replace(counter, amount=1)) == ChangeResult((2,), 0)
    assert await used(ledger) == await used(ledger, "globex")
    assert len(await used(ledger)) == len(counters)


async def usage_concurrent_callers_never_cross_a_cap(ledger: Ledger) -> None:
    """Many callers at once: exactly the cap is admitted, also for multi-counter changes
    taken in opposite orders (which would deadlock without a global lock order)."""
    results = await asyncio.gather(*(acquire(ledger, change("apps", 1, 25)) for _ in range(40)))
    assert sum(r.ok for r in results) == 25
    assert sorted(r.used[0] for r in results if r.ok) == list(range(1, 26))
    assert all(r.used == (25,) for r in results if not r.ok)

    def pair(i: int) -> tuple[UsageChange, UsageChange]:
        a, b = change("left", 1, 15), change("right", 1, 30)
        return (a, b) if i % 2 else (b, a)

    results = await asyncio.gather(*(acquire(ledger, *pair(i)) for i in range(30)))
    assert sum(r.ok for r in results) == 15
    assert await used(ledger) == {("apps", "", ""): 25, ("left", "", ""): 15, ("right", "", ""): 15}


# --- idempotency ------------------------------------------------------------------------


async def idempotency_replays_the_first_result(ledger: Ledger) -> None:
    """A repeated key counts once and returns the first result, whatever it now asks."""
    first = await acquire(ledger, change("apps", 2, 10), key="req-1")
    assert first == ChangeResult((2,))
    again = await acquire(ledger, change("apps", 2, 10), key="req-1", now=T + 60)
    assert again == ChangeResult((2,), replayed=True)
    other = await acquire(ledger, change("apps", 7, 10), change("x", 1), key="req-1")
    assert other == ChangeResult((2,), replayed=True)
    assert await used(ledger) == {("apps", "", ""): 2}
    assert await acquire(ledger, change("apps", 2, 10), key="req-2") == ChangeResult((4,))
    release = await acquire(ledger, change("apps", -1), key="rel-1")
    assert await acquire(ledger, change("apps", -1), key="rel-1") == replace(release, replayed=True)
    assert await used(ledger) == {("apps", "", ""): 3}


async def idempotency_keys_are_per_tenant(ledger: Ledger) -> None:
    """The same key from another tenant is another request."""
    assert await acquire(ledger, change("apps", 1, 5), key="k") == ChangeResult((1,))
    assert await acquire(ledger, change("apps", 1, 5), key="k", tenant="globex") == ChangeResult(
        (1,)
    )
    assert await used(ledger, "globex") == {("apps", "", ""): 1}


async def idempotency_replays_refusals(ledger: Ledger) -> None:
    """A refused request retried with its key is refused again the same way, even once it
    would fit; a new key is a new request."""
    await acquire(ledger, change("apps", 5, 5))
    refused = await acquire(ledger, change("apps", 1, 5), key="late")
    assert refused == ChangeResult((5,), refused=0)
    await ledger.set_usage("acme", "apps", "", "", 0, T + 1)
    retry = await acquire(ledger, change("apps", 1, 5), key="late", now=T + 2)
    assert retry == ChangeResult((5,), refused=0, replayed=True)
    assert await used(ledger) == {("apps", "", ""): 0}
    assert await acquire(ledger, change("apps", 1, 5), key="later") == ChangeResult((1,))


async def idempotency_concurrent_twins_count_once(ledger: Ledger) -> None:
    """Twins racing with one key: one applies, the rest replay its result."""
    results = await asyncio.gather(
        *(acquire(ledger, change("apps", 3, 100), key="twin") for _ in range(20))
    )
    assert sum(not r.replayed for r in results) == 1
    assert {replace(r, replayed=False) for r in results} == {ChangeResult((3,))}
    assert await used(ledger) == {("apps", "", ""): 3}

    await acquire(ledger, change("full", 1, 1))
    refusals = await asyncio.gather(
        *(acquire(ledger, change("full", 1, 1), key="twin-refused") for _ in range(10))
    )
    assert sum(not r.replayed for r in refusals) == 1
    assert {replace(r, replayed=False) for r in refusals} == {ChangeResult((1,), refused=0)}


# --- set_usage and listing --------------------------------------------------------------


async def set_usage_overwrites(ledger: Ledger) -> None:
    """Reconciling sets the value (no cap applies); later changes build on it."""
    await ledger.set_usage("acme", "apps", "", "", 42, T)
    assert await ledger.usage("acme") == [UsageRow("acme", "apps", "", "", 42, T)]
    await acquire(ledger, change("apps", 3, 10))
    await ledger.set_usage("acme", "apps", "", "", 7, T + 1)
    assert await acquire(ledger, change("apps", 3, 10), now=T + 2) == ChangeResult((10,))
    await ledger.set_usage("acme", "apps", "", "", 0, T + 3)
    assert await ledger.usage("acme") == [UsageRow("acme", "apps", "", "", 0, T + 3)]
    with pytest.raises(ValueError, match="-1"):
        await ledger.set_usage("acme", "apps", "", "", -1, T + 4)


async def usage_listing(ledger: Ledger) -> None:
    """Rows of one tenant, by quota, scope, period; ``updated_at`` is the last change."""
    await acquire(ledger, change("tokens", 5, period="2026-12"), now=T + 1)
    await acquire(ledger, change("tokens", 5, period="2026-11"), now=T + 2)
    await acquire(ledger, change("members", 1, scope="org-b"), now=T + 3)
    await acquire(ledger, change("members", 1, scope="org-a"), now=T + 4)
    await acquire(ledger, change("apps", 1), tenant="globex", now=T + 5)
    await acquire(ledger, change("members", 1, 1, scope="org-a"), now=T + 6)  # refused
    assert await ledger.usage("acme") == [
        UsageRow("acme", "members", "org-a", "", 1, T + 4),
        UsageRow("acme", "members", "org-b", "", 1, T + 3),
        UsageRow("acme", "tokens", "", "2026-11", 5, T + 2),
        UsageRow("acme", "tokens", "", "2026-12", 5, T + 1),
    ]
    assert [r.scope for r in await ledger.usage("acme", quota="members")] == ["org-a", "org-b"]
    assert await ledger.usage("acme", quota="apps") == []
    assert await ledger.usage("initech") == []


# --- increase requests ------------------------------------------------------------------


def request(
    request_id: str, tenant: str = "acme", *, status: str = "pending", at: float = T
) -> IncreaseRequest:
    return IncreaseRequest(request_id, tenant, "apps", 500, "launch week", status, created_at=at)


async def requests_add_get_update(ledger: Ledger) -> None:
    """Every field survives; ids are unique; an update replaces the record."""
    full = IncreaseRequest(
        id="r-1",
        tenant="acme",
        limit="apps-collection",
        requested=500,
        reason="launch",
        avg_rps=12.5,
        peak_rps=80.0,
        burst_pattern="hourly spikes",
        endpoints=("/api/v1/apps", "/api/v1/users"),
        needed_by="2026-12-01",
        created_at=T,
    )
    await ledger.add_request(full)
    assert await ledger.get_request("r-1") == full
    assert await ledger.get_request("r-2") is None
    with pytest.raises(ValueError, match="r-1"):
        await ledger.add_request(replace(full, tenant="globex"))
    assert await ledger.get_request("r-1") == full

    decided = replace(
        full,
        status="approved",
        decided_at=T + 60,
        decided_by="ops",
        decision_reason="ok",
        approved_value=400,
        approved_expires_at=T + 86400,
    )
    await ledger.update_request(decided)
    assert await ledger.get_request("r-1") == decided
    with pytest.raises(KeyError, match="r-9"):
        await ledger.update_request(replace(decided, id="r-9"))
    bare = request("r-2")
    await ledger.add_request(bare)
    assert await ledger.get_request("r-2") == bare


async def requests_list_filters(ledger: Ledger) -> None:
    """Filtered by status and tenant, oldest first (ties by id), at most ``limit``."""
    await ledger.add_request(request("c", at=T + 2))
    await ledger.add_request(request("b", "globex", at=T + 1))
    await ledger.add_request(request("a", status="rejected", at=T + 2))
    await ledger.add_request(request("d", at=T))

    async def ids(**filters: str | int) -> list[str]:
        return [r.id for r in await ledger.list_requests(**filters)]  # type: ignore[arg-type]

    assert await ids() == ["d", "b", "a", "c"]
    assert await ids(status="pending") == ["d", "b", "c"]
    assert await ids(tenant="acme") == ["d", "a", "c"]
    assert await ids(status="pending", tenant="acme") == ["d", "c"]
    assert await ids(status="approved") == []
    assert await ids(limit=2) == ["d", "b"]
    await ledger.update_request(replace(request("c", at=T + 2), status="approved"))
    assert await ids(status="approved") == ["c"]


# --- events -----------------------------------------------------------------------------


def event(kind: str, at: float, tenant: str = "acme", **data: object) -> EventRecord:
    return EventRecord(tenant, kind, "apps", at, data)


def stripped(events: list[EventRecord]) -> list[tuple[str, str, float, dict[str, object]]]:
    return [(e.tenant, e.kind, e.at, dict(e.data)) for e in events]


async def events_newest_first(ledger: Ledger) -> None:
    """Newest first (by ``at``, then by insertion); ``since`` is inclusive; ``kinds``
    filters; ``limit`` keeps the newest; ids are assigned and increase."""
    await ledger.add_events([event("warning", T + 1, used=60), event("violation", T + 3)])
    await ledger.add_events([event("warning", T + 2, tenant="globex")])
    await ledger.add_events([event("warning", T + 2), event("quota_exceeded", T + 3)])
    await ledger.add_events([])
    listed = await ledger.events("acme")
    assert stripped(listed) == [
        ("acme", "quota_exceeded", T + 3, {}),
        ("acme", "violation", T + 3, {}),
        ("acme", "warning", T + 2, {}),
        ("acme", "warning", T + 1, {"used": 60}),
    ]
    ids = [e.id for e in listed if e.id is not None]
    assert len(set(ids)) == len(listed)
    assert ids[0] > ids[1]  # the tie at T+3 goes to the later insert
    assert [e.kind for e in await ledger.events("acme", since=T + 2)] == [
        "quota_exceeded",
        "violation",
        "warning",
    ]
    assert [e.at for e in await ledger.events("acme", kinds=["warning"])] == [T + 2, T + 1]
    assert await ledger.events("acme", kinds=[]) == []
    assert [e.kind for e in await ledger.events("acme", limit=1)] == ["quota_exceeded"]
    assert await ledger.events("acme", limit=0) == []
    assert stripped(await ledger.events("globex")) == [("globex", "warning", T + 2, {})]
    assert await ledger.events("initech") == []
    with pytest.raises(TypeError):
        listed[3].data["used"] = 0  # type: ignore[index]


async def events_refuse_what_json_cannot_hold(ledger: Ledger) -> None:
    """A batch with one unstorable event stores none of it."""
    with pytest.raises(ValueError, match="JSON"):
        await ledger.add_events([event("warning", T), event("warning", T, bad=float("inf"))])
    assert await ledger.events("acme") == []


async def purge_drops_old_events_and_keys(ledger: Ledger) -> None:
    """Strictly older than the instants goes; a purged key is free to be used again."""
    await ledger.add_events([event("warning", T), event("warning", T + 10)])
    await ledger.add_events([event("warning", T + 5, tenant="globex")])
    await acquire(ledger, change("apps", 1), key="old", now=T)
    await acquire(ledger, change("apps", 1), key="new", now=T + 10)
    assert await ledger.purge(events_before=T + 10, keys_before=T + 1) == 3
    assert [e.at for e in await ledger.events("acme")] == [T + 10]
    assert await ledger.events("globex") == []
    assert await acquire(ledger, change("apps", 1), key="new") == ChangeResult((2,), None, True)
    assert await acquire(ledger, change("apps", 1), key="old") == ChangeResult((3,))
    assert await ledger.purge(events_before=T, keys_before=T) == 0


# --- the tenant feed --------------------------------------------------------------------


def override(tenant: str, name: str = "apps", value: int = 500, at: float = T) -> OverrideRecord:
    return OverrideRecord(tenant, name, value, None, "launch", None, "ops", at)


async def feed_fresh_database_is_empty(ledger: Ledger) -> None:
    """A fresh ledger is at position 0 with nothing in it, and has nothing to report."""
    assert await ledger.tenant_snapshot() == TenantSnapshot(0, {}, {})
    assert await ledger.tenant_changes(0) == TenantChanges(0, {}, {}, complete=True)


async def feed_reports_every_tenant_write(ledger: Ledger) -> None:
    """Each write to a record or an override is one position; a change reports the
    tenant's whole state now (no record: ``None``; no overrides: ``[]``). Deletes that
    remove nothing, and writes to anything else, are not changes."""
    await ledger.upsert_tenant("acme", "free", None, T)
    await ledger.put_override(override("globex"))  # overrides without a record
    first = await ledger.tenant_changes(0)
    assert first == TenantChanges(
        2, {"acme": "free", "globex": None}, {"acme": [], "globex": [override("globex")]}, True
    )
    await acquire(ledger, change("apps", 1, 5), key="k")
    await ledger.set_usage("acme", "apps", "", "", 3, T + 1)
    await ledger.add_events([event("warning", T + 1)])
    await ledger.add_request(request("r-1"))
    assert await ledger.delete_tenant("initech") is False
    assert await ledger.delete_override("acme", "apps") is False
    assert await ledger.tenant_changes(2) == TenantChanges(2, {}, {}, complete=True)

    await ledger.upsert_tenant("acme", "pro", None, T + 2)
    await ledger.put_override(override("acme", "tokens", 9, T + 2))
    await ledger.put_override(override("acme", "apps", 7, T + 2))
    assert await ledger.tenant_changes(2) == TenantChanges(
        5,
        {"acme": "pro"},
        {"acme": [override("acme", "apps", 7, T + 2), override("acme", "tokens", 9, T + 2)]},
        True,
    )
    assert await ledger.delete_tenant("acme", now=T + 3) is True
    assert await ledger.delete_override("globex", "apps") is True  # undated
    assert await ledger.delete_override("acme", "tokens", now=T + 3) is True
    assert await ledger.tenant_changes(5) == TenantChanges(
        8,
        {"acme": None, "globex": None},
        {"acme": [override("acme", "apps", 7, T + 2)], "globex": []},
        True,
    )
    assert await ledger.tenant_changes(8) == TenantChanges(8, {}, {}, complete=True)


async def feed_snapshot_then_changes(ledger: Ledger) -> None:
    """A snapshot holds every tenant with a record, every tenant with overrides (expired
    ones too), and the position to follow on from; following on reports what came next."""
    expired = OverrideRecord("acme", "apps", 5, None, "old", T - 60, "ops", T - 3600)
    await ledger.put_override(expired)
    await ledger.put_override(override("acme", "tokens"))
    await ledger.upsert_tenant("acme", "free", None, T)
    await ledger.upsert_tenant("globex", "pro", {"region": "eu"}, T)
    await ledger.put_override(override("orphan"))
    snapshot = await ledger.tenant_snapshot()
    assert snapshot == TenantSnapshot(
        5,
        {"acme": "free", "globex": "pro"},
        {"acme": [expired, override("acme", "tokens")], "orphan": [override("orphan")]},
    )
    assert await ledger.tenant_changes(snapshot.cursor) == TenantChanges(5, {}, {}, True)
    await ledger.upsert_tenant("initech", "free", None, T + 1)
    assert await ledger.tenant_changes(snapshot.cursor) == TenantChanges(
        6, {"initech": "free"}, {"initech": []}, True
    )
    later = await ledger.tenant_snapshot()
    assert later.cursor == 6
    assert later.plans == {"acme": "free", "globex": "pro", "initech": "free"}


async def feed_limit_pages_through_rows(ledger: Ledger) -> None:
    """At most ``limit`` feed rows per call, the cursor moving over exactly those; each
    page reports the state now, so a tenant written again later reads its newest state."""
    for index, tenant in enumerate(["a", "b", "a", "c", "d"]):
        await ledger.upsert_tenant(tenant, f"plan-{index}", None, T + index)
    pages: list[TenantChanges] = []
    cursor = 0
    while True:
        page = await ledger.tenant_changes(cursor, limit=2)
        if page.cursor == cursor:
            break
        pages.append(page)
        cursor = page.cursor
    assert [(p.cursor, p.plans) for p in pages] == [
        (2, {"a": "plan-2", "b": "plan-1"}),
        (4, {"a": "plan-2", "c": "plan-3"}),
        (5, {"d": "plan-4"}),
    ]
    assert all(p.complete for p in pages)
    assert (await ledger.tenant_changes(4, limit=1)).cursor == 5
    with pytest.raises(ValueError, match="limit"):
        await ledger.tenant_changes(0, limit=0)
    with pytest.raises(ValueError, match="after"):
        await ledger.tenant_changes(-1)


async def feed_purge_sends_late_pollers_to_a_snapshot(ledger: Ledger) -> None:
    """Purging drops feed rows older than ``keys_before``; a cursor older than what is
    kept, or ahead of the head, is told to take a snapshot (with the head as cursor)."""
    await ledger.upsert_tenant("a", "free", None, T)
    await ledger.upsert_tenant("b", "free", None, T + 10)
    await ledger.upsert_tenant("c", "free", None, T + 20)
    assert await ledger.purge(events_before=T, keys_before=T + 15) == 2
    assert await ledger.tenant_changes(0) == TenantChanges(3, {}, {}, complete=False)
    assert await ledger.tenant_changes(1) == TenantChanges(3, {}, {}, complete=False)
    assert await ledger.tenant_changes(2) == TenantChanges(3, {"c": "free"}, {"c": []}, True)
    assert await ledger.tenant_changes(3) == TenantChanges(3, {}, {}, complete=True)
    assert await ledger.tenant_changes(4) == TenantChanges(3, {}, {}, complete=False)
    snapshot = await ledger.tenant_snapshot()
    assert (snapshot.cursor, sorted(snapshot.plans)) == (3, ["a", "b", "c"])

    assert await ledger.purge(events_before=T, keys_before=T + 100) == 1  # every row
    assert await ledger.tenant_changes(2) == TenantChanges(3, {}, {}, complete=False)
    assert await ledger.tenant_changes(3) == TenantChanges(3, {}, {}, complete=True)
    await ledger.upsert_tenant("d", "free", None, T + 30)  # the head goes on from 3
    assert await ledger.tenant_changes(3) == TenantChanges(4, {"d": "free"}, {"d": []}, True)


async def feed_purge_keeps_a_gap_free_run(ledger: Ledger) -> None:
    """Rows need not be dated in order (writers' clocks differ): purging stops at the
    first row still young, so what is kept never has a hole a poller could skip."""
    await ledger.upsert_tenant("a", "free", None, T)
    await ledger.upsert_tenant("b", "free", None, T + 50)
    await ledger.upsert_tenant("c", "free", None, T)  # a slow clock
    await ledger.upsert_tenant("d", "free", None, T + 60)
    assert await ledger.purge(events_before=T, keys_before=T + 10) == 1
    assert (await ledger.tenant_changes(0)).complete is False
    assert (await ledger.tenant_changes(1)).plans == dict.fromkeys("bcd", "free")
    assert await ledger.purge(events_before=T, keys_before=T + 55) == 2  # b, then c
    assert (await ledger.tenant_changes(2)).complete is False
    assert (await ledger.tenant_changes(3)).plans == {"d": "free"}


async def feed_deletes_are_dated(ledger: Ledger) -> None:
    """A delete given ``now`` is kept as long as that date says; an undated one is
    dated like the newest row before it."""
    await ledger.upsert_tenant("a", "free", None, T)
    await ledger.delete_tenant("a", now=T + 100)
    await ledger.put_override(override("b", at=T + 5))
    await ledger.delete_override("b", "apps")  # undated: T + 5
    assert await ledger.purge(events_before=T, keys_before=T + 50) == 1
    assert await ledger.tenant_changes(1) == TenantChanges(
        4, {"a": None, "b": None}, {"a": [], "b": []}, True
    )
    assert await ledger.purge(events_before=T, keys_before=T + 101) == 3
    assert (await ledger.tenant_changes(3)).complete is False


async def feed_concurrent_writers_leave_no_gap(ledger: Ledger) -> None:
    """Writers racing each other and a poller: every position is handed out once, and
    the poller, following the cursor, ends with every write's state."""
    plans = {f"t{i:02d}": f"plan-{i % 3}" for i in range(40)}
    seen: dict[str, str | None] = {}
    cursor = 0
    writing = True

    async def poll() -> None:
        nonlocal cursor
        while True:
            done = not writing  # read before polling: the last poll follows every write
            page = await ledger.tenant_changes(cursor, limit=7)
            assert page.complete
            seen.update(page.plans)
            if done and page.cursor == cursor:
                return
            cursor = page.cursor
            await asyncio.sleep(0)  # the in-memory ledger never suspends: let writers run

    async def lane(index: int) -> None:
        """One writer of four: few enough that the poller is not queued behind them all
        for a database ledger's worker threads."""
        for tenant, plan in list(plans.items())[index::4]:
            await ledger.upsert_tenant(tenant, plan, None, T)

    poller = asyncio.ensure_future(poll())
    await asyncio.gather(*(lane(index) for index in range(4)))
    writing = False
    await poller
    assert seen == plans
    assert cursor == len(plans)
    snapshot = await ledger.tenant_snapshot()
    assert (snapshot.cursor, snapshot.plans) == (len(plans), plans)


# --- lifecycle --------------------------------------------------------------------------


async def ping_and_close(ledger: Ledger) -> None:
    """Ready until closed; closed, it answers nothing (and closing twice is fine)."""
    assert await ledger.ping() is True
    await ledger.close()
    assert await ledger.ping() is False
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.get_tenant("acme")
    await ledger.close()


SCENARIOS: list[tuple[str, Scenario]] = [
    ("tenants-upsert-get-delete", tenants_upsert_get_delete),
    ("tenants-plan-change-keeps-usage", tenants_plan_change_keeps_usage),
    ("tenants-list-prefix-limit-order", tenants_list_prefix_limit_order),
    ("tenants-metadata-is-json", tenants_metadata_is_json),
    ("overrides-put-replace-delete-list", overrides_put_replace_delete_list),
    ("usage-cap-exactly-reached", usage_cap_exactly_reached),
    ("usage-all-or-nothing", usage_all_or_nothing),
    ("usage-refused-index-is-the-first", usage_refused_index_is_the_first),
    ("usage-same-counter-twice", usage_same_counter_twice),
    ("usage-negative-floors-at-zero", usage_negative_floors_at_zero),
    ("usage-without-limit", usage_without_limit),
    ("usage-scopes-periods-tenants-independent", usage_scopes_periods_tenants_independent),
    ("usage-concurrent-callers-never-cross-a-cap", usage_concurrent_callers_never_cross_a_cap),
    ("idempotency-replays-the-first-result", idempotency_replays_the_first_result),
    ("idempotency-keys-are-per-tenant", idempotency_keys_are_per_tenant),
    ("idempotency-replays-refusals", idempotency_replays_refusals),
    ("idempotency-concurrent-twins-count-once", idempotency_concurrent_twins_count_once),
    ("set-usage-overwrites", set_usage_overwrites),
    ("usage-listing", usage_listing),
    ("requests-add-get-update", requests_add_get_update),
    ("requests-list-filters", requests_list_filters),
    ("events-newest-first", events_newest_first),
    ("events-refuse-what-json-cannot-hold", events_refuse_what_json_cannot_hold),
    ("purge-drops-old-events-and-keys", purge_drops_old_events_and_keys),
    ("feed-fresh-database-is-empty", feed_fresh_database_is_empty),
    ("feed-reports-every-tenant-write", feed_reports_every_tenant_write),
    ("feed-snapshot-then-changes", feed_snapshot_then_changes),
    ("feed-limit-pages-through-rows", feed_limit_pages_through_rows),
    ("feed-purge-sends-late-pollers-to-a-snapshot", feed_purge_sends_late_pollers_to_a_snapshot),
    ("feed-purge-keeps-a-gap-free-run", feed_purge_keeps_a_gap_free_run),
    ("feed-deletes-are-dated", feed_deletes_are_dated),
    ("feed-concurrent-writers-leave-no-gap", feed_concurrent_writers_leave_no_gap),
    ("ping-and-close", ping_and_close),
]
"""Every scenario, by the name that test ids use."""
