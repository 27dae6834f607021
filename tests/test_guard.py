"""Guard: decisions, binding rules, headers in every style, leases, tenants."""

from __future__ import annotations

import re

import pytest

from tenantguard import Guard, UnknownLeaseError, UnknownPlanError, parse_policy

MINUTE = 1_700_000_040.0  # a whole minute since the epoch

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
  - {name: big, enforcement: contract}
default_plan: free
headers: [HEADERS]
rate_limits:
  - name: reports
    match: {paths: ["/reports/**"]}
    window: 1m
    limits: {free: 3, pro: 10, big: unlimited}
  - name: orgs
    match: {paths: ["/orgs"]}
    window: 1m
    limits: {free: unavailable, default: 5}
  - name: search
    match: {paths: ["/search"]}
    per: [tenant, client]
    window: 1m
    limits: {default: 2}
  - name: export
    match: {paths: ["/export"]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 2}
  - name: shadowed
    match: {paths: ["/beta"]}
    window: 1m
    limits: {default: 1}
    mode: shadow
  - name: by-ip
    match: {paths: ["/login"]}
    per: [ip]
    window: 10s
    algorithm: sliding-window
    limits: {default: 2}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 20}
    burst: {default: 5}
"""


class Clock:
    def __init__(self, now: float = MINUTE) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(headers: str = "okta", clock: Clock | None = None) -> tuple[Guard, Clock]:
    clock = clock or Clock()
    return Guard(parse_policy(POLICY.replace("HEADERS", headers)), clock=clock), clock


async def test_binding_rule_is_the_least_remaining_when_allowed() -> None:
    guard, _ = make()
    decision = await guard.check("acme", "GET", "/reports/1")
    assert decision.status == 200
    assert decision.allowed
    # reports has 2 left of 3, the tenant bucket 4 of 5: reports binds
    assert (decision.rule, decision.limit, decision.remaining) == ("reports", 3, 2)
    assert decision.reset == int(MINUTE) + 60
    assert decision.retry_after is None
    assert [check.rule for check in decision.checks] == ["reports", "tenant-bucket"]


async def test_binding_rule_is_the_longest_wait_when_denied() -> None:
    guard, clock = make()
    for _ in range(3):
        assert (await guard.check("acme", "GET", "/reports/x")).allowed
    clock.now += 0.5
    decision = await guard.check("acme", "GET", "/reports/x")
    assert decision.status == 429
    assert decision.rule == "reports"
    assert decision.retry_after == 60  # 59.5 s rounded up
    outcomes = {check.rule: check.outcome for check in decision.checks}
    assert outcomes == {"reports": "denied", "tenant-bucket": "uncounted"}


async def test_denied_request_consumes_nothing_anywhere() -> None:
    guard, _ = make()
    for _ in range(3):
        await guard.check("acme", "GET", "/reports/x")
    for _ in range(10):
        assert not (await guard.check("acme", "GET", "/reports/x")).allowed
    # the bucket (burst 5) saw only the three admitted requests
    decision = await guard.check("acme", "GET", "/other")
    assert decision.allowed
    assert decision.remaining == 1


async def test_unavailable_is_403_and_touches_nothing() -> None:
    guard, _ = make()
    decision = await guard.check("acme", "POST", "/orgs")
    assert decision.status == 403
    assert not decision.allowed
    assert decision.rule == "orgs"
    assert decision.reason is not None
    assert "not available on plan 'free'" in decision.reason
    assert (await guard.check("acme", "GET", "/x")).remaining == 4  # bucket untouched


async def test_unlimited_touches_no_counter() -> None:
    guard, _ = make()
    await guard.tenants.upsert("big-co", plan="big")
    for _ in range(5):
        decision = await guard.check("big-co", "GET", "/reports/1")
    assert decision.allowed
    assert decision.rule == "tenant-bucket"
    unlimited = [check for check in decision.checks if check.rule == "reports"]
    assert unlimited[0].outcome == "unlimited"
    assert unlimited[0].limit is None


async def test_plan_values_follow_the_tenant() -> None:
    guard, _ = make()
    await guard.tenants.upsert("acme", plan="pro")
    decision = await guard.check("acme", "GET", "/reports/1")
    assert decision.plan == "pro"
    assert decision.checks[0].limit == 10
    assert (await guard.check("stranger", "GET", "/reports/1")).plan == "free"


async def test_changing_plan_keeps_counters() -> None:
    guard, _ = make()
    for _ in range(3):
        await guard.check("acme", "GET", "/reports/1")
    await guard.tenants.upsert("acme", plan="pro")
    decision = await guard.check("acme", "GET", "/reports/1")
    assert decision.allowed
    # 10 - 4: the three before the upgrade still count
    assert (decision.checks[0].rule, decision.checks[0].remaining) == ("reports", 6)


async def test_cost_counts_and_cost_above_limit_is_refused_with_reason() -> None:
    guard, _ = make()
    decision = await guard.check("acme", "GET", "/reports/1", cost=2)
    assert decision.remaining == 1
    decision = await guard.check("acme", "GET", "/reports/1", cost=4)
    assert decision.status == 429
    assert decision.retry_after is None
    assert decision.reason is not None
    assert "cost 4 exceeds" in decision.reason
    with pytest.raises(ValueError, match="cost"):
        await guard.check("acme", "GET", "/reports/1", cost=0)


async def test_per_client_keys_are_separate() -> None:
    guard, _ = make()
    for _ in range(2):
        assert (await guard.check("acme", "GET", "/search", client="a")).allowed
    assert not (await guard.check("acme", "GET", "/search", client="a")).allowed
    assert (await guard.check("acme", "GET", "/search", client="b")).allowed
    assert (await guard.check("other", "GET", "/search", client="a")).allowed


async def test_per_ip_keys_cross_tenants() -> None:
    guard, _ = make()
    assert (await guard.check("t1", "POST", "/login", ip="203.0.113.9")).allowed
    assert (await guard.check("t2", "POST", "/login", ip="203.0.113.9")).allowed
    assert not (await guard.check("t3", "POST", "/login", ip="203.0.113.9")).allowed
    assert (await guard.check("t3", "POST", "/login", ip="198.51.100.1")).allowed


async def test_shadow_rule_counts_and_reports_but_never_denies() -> None:
    guard, _ = make()
    first = await guard.check("acme", "GET", "/beta")
    second = await guard.check("acme", "GET", "/beta")
    assert first.allowed
    assert second.allowed
    shadow = next(check for check in second.checks if check.rule == "shadowed")
    assert shadow.outcome == "shadow-denied"
    assert second.rule == "tenant-bucket"  # a shadow rule never binds


async def test_concurrency_leases_release_and_expire() -> None:
    guard, clock = make()
    first = await guard.check("acme", "POST", "/export")
    second = await guard.check("acme", "POST", "/export")
    third = await guard.check("acme", "POST", "/export")
    assert first.lease is not None
    assert second.lease is not None
    assert third.status == 429
    assert third.lease is None
    await guard.release(first.lease)
    await guard.release(first.lease)  # idempotent
    fourth = await guard.check("acme", "POST", "/export")
    assert fourth.allowed
    clock.now += 31  # every lease has outlived its ttl
    assert (await guard.check("acme", "POST", "/export")).allowed
    assert (await guard.check("acme", "POST", "/export")).allowed
    with pytest.raises(UnknownLeaseError):
        await guard.release("garbage")
    # a token whose id is not one tenantguard makes (spaces, "|") is not a lease either
    body = fourth.lease.partition(".")[2] if fourth.lease else ""
    for forged in ("x|1 c|0|0|0|1|zz", "a b", "short"):
        with pytest.raises(UnknownLeaseError):
            await guard.release(f"{forged}.{body}")


async def test_okta_headers() -> None:
    guard, _ = make("okta")
    headers = (await guard.check("acme", "GET", "/reports/1")).headers
    assert headers == {
        "X-Rate-Limit-Limit": "3",
        "X-Rate-Limit-Remaining": "2",
        "X-Rate-Limit-Reset": str(int(MINUTE) + 60),
    }


async def test_github_headers() -> None:
    guard, _ = make("github")
    await guard.check("acme", "GET", "/reports/1")
    headers = (await guard.check("acme", "GET", "/reports/1")).headers
    assert headers == {
        "x-ratelimit-limit": "3",
        "x-ratelimit-remaining": "1",
        "x-ratelimit-used": "2",
        "x-ratelimit-reset": str(int(MINUTE) + 60),
        "x-ratelimit-resource": "reports",
    }


SF_ITEM = re.compile(r'^"(?P<name>[^"]+)"(?P<params>(;[a-z]+=\d+)+)$')


def parse_sf_list(value: str) -> dict[str, dict[str, int]]:
    """A strict reader of the structured-field lists the draft defines."""
    out = {}
    for member in value.split(", "):
        match = SF_ITEM.match(member)
        assert match, member
        params = dict(part.split("=") for part in match.group("params")[1:].split(";"))
        out[match.group("name")] = {key: int(number) for key, number in params.items()}
    return out


async def test_ietf_headers_are_structured_fields() -> None:
    guard, clock = make("ietf")
    clock.now = MINUTE + 15
    decision = await guard.check("acme", "GET", "/reports/1")
    policies = parse_sf_list(decision.headers["RateLimit-Policy"])
    states = parse_sf_list(decision.headers["RateLimit"])
    assert policies == {"reports": {"q": 3, "w": 60}, "tenant-bucket": {"q": 20, "w": 10}}
    assert states["reports"] == {"r": 2, "t": 45}
    assert states["tenant-bucket"]["r"] == 4


async def test_denial_headers_carry_retry_after() -> None:
    guard, clock = make("okta, ietf")
    clock.now = MINUTE + 50
    for _ in range(3):
        await guard.check("acme", "GET", "/reports/1")
    headers = (await guard.check("acme", "GET", "/reports/1")).headers
    assert headers["Retry-After"] == "10"
    assert headers["X-Rate-Limit-Remaining"] == "0"
    assert parse_sf_list(headers["RateLimit"])["reports"] == {"r": 0, "t": 10}


async def test_no_rule_no_headers() -> None:
    text = POLICY.replace("HEADERS", "okta").replace('paths: ["/**"]', 'paths: ["/api/**"]')
    guard = Guard(parse_policy(text), clock=Clock())
    decision = await guard.check("acme", "GET", "/elsewhere")
    assert decision.allowed
    assert decision.rule is None
    assert decision.headers == {}
    assert decision.checks == ()


async def test_tenants_api() -> None:
    guard, clock = make()
    record = await guard.tenants.upsert("acme", plan="pro", metadata={"region": "eu"})
    assert (record.plan, record.created_at) == ("pro", MINUTE)
    clock.now += 5
    record = await guard.tenants.upsert("acme", plan="big")
    assert record.metadata == {"region": "eu"}  # kept when not given
    assert (record.created_at, record.updated_at) == (MINUTE, MINUTE + 5)
    await guard.tenants.upsert("zeta", plan="free")
    assert [r.tenant for r in await guard.tenants.list()] == ["acme", "zeta"]
    got = await guard.tenants.get("acme")
    assert got is not None
    assert got.plan == "big"
    assert await guard.tenants.delete("zeta")
    assert not await guard.tenants.delete("zeta")
    assert await guard.tenants.get("zeta") is None
    with pytest.raises(UnknownPlanError, match="plan 'gold' is not in the policy"):
        await guard.tenants.upsert("acme", plan="gold")


async def test_as_dict_shape() -> None:
    guard, _ = make()
    body = (await guard.check("acme", "GET", "/reports/1")).as_dict()
    assert set(body) >= {
        "allowed",
        "status",
        "tenant",
        "plan",
        "rule",
        "limit",
        "remaining",
        "reset",
        "retry_after",
        "headers",
        "checks",
        "lease",
    }
    assert body["checks"][0]["rule"] == "reports"


async def test_unknown_counter_store_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="counter store 'mongodb' is not supported"):
        Guard(parse_policy(POLICY.replace("HEADERS", "okta")), counters="mongodb://x")
