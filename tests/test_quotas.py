"""Entity caps, usage quotas, overrides, increase requests, events and ``limits``,
through the Guard, on every ledger (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tenantguard import (
    Guard,
    OverrideRefused,
    QuotaExceeded,
    RequestConflict,
    UnknownLimitError,
    UnknownQuotaError,
    parse_policy,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()
DECEMBER = datetime(2026, 12, 1, 0, 0, tzinfo=UTC).timestamp()

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
  - {name: big, enforcement: contract}
default_plan: free
warning_threshold: 50
rate_limits:
  - name: api
    match: {paths: ["/api/**"]}
    window: 1m
    limits: {free: 10, pro: 100, big: 1000}
quotas:
  - name: applications
    limits: {free: 3, pro: 10, big: 10}
  - name: m2m-applications
    counts_toward: [applications]
    limits: {free: 2, default: 10}
  - name: saml-applications
    counts_toward: [applications]
    limits: {free: unavailable, default: 5}
  - name: users-per-organization
    per: organization
    limits: {default: 2}
  - name: access-tokens
    period: month
    limits: {free: 5, default: 1000}
  - name: webhooks
    limits: {default: unlimited}
entitlements:
  audit-log-retention: {free: 14d, default: 90d}
"""


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return "memory"


@pytest.fixture
async def guard(ledger_url: str) -> AsyncIterator[Guard]:
    async with Guard(parse_policy(POLICY), ledger=ledger_url, clock=Clock()) as made:
        yield made


def clock_of(guard: Guard) -> Clock:
    clock = guard._clock
    assert isinstance(clock, Clock)
    return clock


async def test_entity_cap_is_exact_and_refusal_says_what_to_do(guard: Guard) -> None:
    for used in range(1, 4):
        usage = await guard.quotas.acquire("acme", "applications")
        assert (usage.used, usage.limit, usage.remaining) == (used, 3, 3 - used)
    with pytest.raises(QuotaExceeded) as refused:
        await guard.quotas.acquire("acme", "applications")
    error = refused.value
    assert (error.status, error.code, error.limit, error.used) == (403, "quota_exceeded", 3, 3)
    assert "upgrade the plan" in str(error)
    assert (await guard.quotas.get("acme", "applications")).used == 3


async def test_soft_plan_refusal_points_to_an_increase(guard: Guard) -> None:
    await guard.tenants.upsert("acme", plan="pro")
    await guard.quotas.set_usage("acme", "applications", 10)
    with pytest.raises(QuotaExceeded, match=r"used, 1 more requested\. Request an increase"):
        await guard.quotas.acquire("acme", "applications")


async def test_counts_toward_is_atomic(guard: Guard) -> None:
    await guard.quotas.acquire("acme", "applications")
    await guard.quotas.acquire("acme", "m2m-applications")
    assert (await guard.quotas.get("acme", "applications")).used == 2
    await guard.quotas.acquire("acme", "m2m-applications")  # 2 of 2 m2m, 3 of 3 apps
    with pytest.raises(QuotaExceeded) as refused:
        await guard.quotas.acquire("acme", "m2m-applications")
    assert refused.value.quota in ("m2m-applications", "applications")
    # refused as one: neither count moved
    assert (await guard.quotas.get("acme", "applications")).used == 3
    assert (await guard.quotas.get("acme", "m2m-applications")).used == 2
    await guard.quotas.release("acme", "m2m-applications")
    assert (await guard.quotas.get("acme", "applications")).used == 2


async def test_unavailable_quota_is_refused_with_403(guard: Guard) -> None:
    with pytest.raises(QuotaExceeded, match="not available on plan 'free'") as refused:
        await guard.quotas.acquire("acme", "saml-applications")
    assert refused.value.status == 403
    assert (await guard.quotas.get("acme", "applications")).used == 0


async def test_per_scope_counts_separately(guard: Guard) -> None:
    for org in ("org-1", "org-2"):
        for _ in range(2):
            await guard.quotas.acquire("acme", "users-per-organization", scope=org)
    with pytest.raises(QuotaExceeded):
        await guard.quotas.acquire("acme", "users-per-organization", scope="org-1")
    with pytest.raises(ValueError, match="counted per organization"):
        await guard.quotas.acquire("acme", "users-per-organization")


async def test_idempotency_key_counts_once(guard: Guard) -> None:
    first = await guard.quotas.acquire("acme", "applications", idempotency_key="req-1")
    again = await guard.quotas.acquire("acme", "applications", idempotency_key="req-1")
    assert first.used == again.used == 1
    assert (await guard.quotas.get("acme", "applications")).used == 1
    await guard.quotas.release("acme", "applications", idempotency_key="rel-1")
    await guard.quotas.release("acme", "applications", idempotency_key="rel-1")
    assert (await guard.quotas.get("acme", "applications")).used == 0


async def test_usage_quota_resets_at_the_calendar_boundary(guard: Guard) -> None:
    for _ in range(5):
        await guard.quotas.acquire("acme", "access-tokens")
    with pytest.raises(QuotaExceeded) as refused:
        await guard.quotas.acquire("acme", "access-tokens")
    error = refused.value
    assert (error.status, error.code) == (429, "usage_exceeded")
    assert error.resets_at == DECEMBER
    assert "2026-12-01T00:00:00Z" in str(error)
    clock_of(guard).now = DECEMBER  # a new month
    usage = await guard.quotas.acquire("acme", "access-tokens")
    assert (usage.used, usage.period) == (1, "2026-12")


async def test_downgrade_keeps_data_and_refuses_only_new(guard: Guard) -> None:
    await guard.tenants.upsert("acme", plan="pro")
    for _ in range(6):
        await guard.quotas.acquire("acme", "applications")
    await guard.tenants.upsert("acme", plan="free")
    assert (await guard.quotas.get("acme", "applications")).used == 6  # nothing deleted
    with pytest.raises(QuotaExceeded, match="6 in use but plan 'free' allows 3"):
        await guard.quotas.acquire("acme", "applications")
    await guard.quotas.release("acme", "applications")  # giving back always works
    assert (await guard.quotas.get("acme", "applications")).used == 5


async def test_unknown_quota(guard: Guard) -> None:
    with pytest.raises(UnknownQuotaError, match="no quota 'nope'"):
        await guard.quotas.acquire("acme", "nope")


async def test_hard_plan_refuses_raising_overrides(guard: Guard) -> None:
    with pytest.raises(OverrideRefused, match="hard plan"):
        await guard.overrides.set("acme", "applications", value=50, reason="please")
    lowered = await guard.overrides.set("acme", "applications", value=1, reason="abuse")
    assert lowered.value == 1
    await guard.quotas.acquire("acme", "applications")
    with pytest.raises(QuotaExceeded):
        await guard.quotas.acquire("acme", "applications")


async def test_soft_plan_override_value_and_multiplier(guard: Guard) -> None:
    await guard.tenants.upsert("acme", plan="pro")
    await guard.overrides.set("acme", "api", multiplier=5, reason="launch week")
    decision = await guard.check("acme", "GET", "/api/x")
    assert decision.limit == 500
    await guard.overrides.set("acme", "api", value=7, reason="trim")
    assert (await guard.check("acme", "GET", "/api/x")).limit == 7
    assert await guard.overrides.remove("acme", "api")
    assert (await guard.check("acme", "GET", "/api/x")).limit == 100
    with pytest.raises(UnknownLimitError):
        await guard.overrides.set("acme", "nothing", value=1, reason="x")
    with pytest.raises(ValueError, match="exactly one"):
        await guard.overrides.set("acme", "api", value=1, multiplier=2, reason="x")


async def test_override_expires_by_the_clock(guard: Guard) -> None:
    await guard.tenants.upsert("acme", plan="pro")
    await guard.overrides.set("acme", "api", value=3, reason="until noon", expires_at=NOW + 60)
    assert (await guard.check("acme", "GET", "/api/x")).limit == 3
    clock_of(guard).now = NOW + 60
    assert (await guard.check("acme", "GET", "/api/x")).limit == 100


async def test_contract_plan_takes_override_and_says_default_otherwise(guard: Guard) -> None:
    await guard.tenants.upsert("bigco", plan="big")
    await guard.overrides.set("bigco", "applications", value=400, reason="contract #12")
    limits = await guard.limits("bigco")
    quotas = {quota["name"]: quota for quota in limits["quotas"]}
    assert (quotas["applications"]["limit"], quotas["applications"]["source"]) == (
        400,
        "override",
    )
    assert quotas["webhooks"]["source"] == "contract-default"
    rates = {rate["name"]: rate for rate in limits["rate_limits"]}
    assert (rates["api"]["value"], rates["api"]["source"]) == (1000, "contract-default")
    assert limits["entitlements"] == {"audit-log-retention": "90d"}


async def test_limits_reports_usage(guard: Guard) -> None:
    await guard.quotas.acquire("acme", "users-per-organization", scope="org-1")
    await guard.quotas.acquire("acme", "access-tokens", amount=2)
    limits = await guard.limits("acme")
    quotas = {quota["name"]: quota for quota in limits["quotas"]}
    assert quotas["access-tokens"]["used"] == 2
    assert quotas["access-tokens"]["resets_at"] == DECEMBER
    assert quotas["users-per-organization"]["usage"] == [{"scope": "org-1", "used": 1}]
    assert (limits["plan"], limits["enforcement"]) == ("free", "hard")


async def test_increase_requests(guard: Guard) -> None:
    hard = await guard.increase_requests.file(
        "acme", limit="api", requested=50, reason="launch", avg_rps=3, peak_rps=9,
        burst_pattern="hourly", endpoints=["/api/v1/users"], needed_by="2026-12-01",
    )  # fmt: skip
    assert hard.status == "rejected"
    assert hard.decision_reason is not None
    assert "upgrade" in hard.decision_reason
    await guard.tenants.upsert("acme", plan="pro")
    pending = await guard.increase_requests.file(
        "acme", limit="api", requested=300, reason="launch", peak_rps=9
    )
    assert pending.status == "pending"
    assert [r.id for r in await guard.increase_requests.list(status="pending")] == [pending.id]
    approved = await guard.increase_requests.approve(pending.id, value=250, expires_at=NOW + 3600)
    assert (approved.status, approved.approved_value) == ("approved", 250)
    assert (await guard.check("acme", "GET", "/api/x")).limit == 250
    with pytest.raises(RequestConflict):
        await guard.increase_requests.reject(pending.id, reason="too late")
    other = await guard.increase_requests.file(
        "acme", limit="applications", requested=20, reason="x"
    )
    rejected = await guard.increase_requests.reject(other.id, reason="not justified")
    assert (rejected.status, rejected.decision_reason) == ("rejected", "not justified")


async def test_events_are_recorded(guard: Guard) -> None:
    await guard.tenants.upsert("acme", plan="free")
    for _ in range(11):
        await guard.check("acme", "GET", "/api/x")  # 10 per minute: warning at 5, then a 429
    for _ in range(3):
        await guard.check("acme", "GET", "/api/x")  # more denials: still one violation
    with pytest.raises(QuotaExceeded):
        await guard.quotas.acquire("acme", "saml-applications")
    await guard.events.flush()
    events = await guard.ledger.events("acme", limit=100)
    kinds = sorted(event.kind for event in events)
    assert kinds == ["plan_changed", "quota_exceeded", "violation", "warning"]


@pytest.mark.parametrize("amount", [0, -1, True])
async def test_amount_must_be_positive(guard: Guard, amount: int) -> None:
    await guard.quotas.acquire("acme", "applications")
    for call in (guard.quotas.acquire, guard.quotas.release):
        with pytest.raises(ValueError, match="amount must be a whole number >= 1"):
            await call("acme", "applications", amount)
    assert (await guard.quotas.get("acme", "applications")).used == 1
