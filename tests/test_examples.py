"""The shipped examples reproduce the two seed documents, number for number.

``examples/okta-management.yaml`` is walked cell by cell against the Okta management
rate-limit table; ``examples/logto.yaml`` is compared with the Logto Dev and Pro tables
and its tenant bucket is driven through one burst and one refill.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from tenantguard import Guard, Policy, load_policy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OKTA = EXAMPLES / "okta-management.yaml"
LOGTO = EXAMPLES / "logto.yaml"

MINUTE = 1_700_000_040.0  # an exact minute boundary (divisible by 60)
NEXT_MINUTE = MINUTE + 60


@pytest.fixture(scope="module")
def okta() -> Policy:
    return load_policy(OKTA)


@pytest.fixture(scope="module")
def logto() -> Policy:
    return load_policy(LOGTO)


def test_examples_load(okta: Policy, logto: Policy) -> None:
    assert [plan.name for plan in okta.plans] == [
        "developer-free",
        "developer-paid",
        "one-app",
        "enterprise",
        "workforce-identity",
    ]
    assert okta.default_plan == "developer-free"
    assert [plan.name for plan in logto.plans] == ["dev", "pro", "enterprise"]
    assert logto.default_plan == "dev"


# --- Okta -------------------------------------------------------------------------------

OKTA_PLANS = ("developer-free", "developer-paid", "one-app", "enterprise", "workforce-identity")


class OktaRow(NamedTuple):
    rule: str
    method: str
    path: str
    limits: tuple[int | None, int | None, int | None, int | None, int | None]


# The table of okta-management-rate-limits.md, row by row in its order; None is N/A.
# Each example path is chosen to exercise precedence against the neighbouring rules.
# fmt: off
OKTA_TABLE = [
    OktaRow("apps-collection", "GET", "/api/v1/apps", (20, 25, 25, 100, 100)),
    OktaRow("app-by-id", "GET", "/api/v1/apps/0oa123", (100, 300, 300, 600, 500)),
    OktaRow("groups-collection", "POST", "/api/v1/groups", (100, 300, 300, 600, 500)),
    OktaRow("group-by-id", "DELETE", "/api/v1/groups/00g1", (100, 300, 300, 600, 1000)),
    OktaRow("users-collection", "POST", "/api/v1/users", (100, 300, 300, 600, 600)),
    OktaRow("user-get", "GET", "/api/v1/users/00u1", (100, 300, 300, 1000, 2000)),
    OktaRow("user-update", "PUT", "/api/v1/users/00u1", (100, 300, 300, 600, 600)),
    OktaRow("logs", "GET", "/api/v1/logs", (20, 25, 25, 50, 120)),
    OktaRow("events", "GET", "/api/v1/events", (20, 25, 25, 50, 100)),
    OktaRow("sessions", "DELETE", "/api/v1/sessions/102abc", (100, 300, 300, 600, 750)),
    OktaRow("orgs", "POST", "/api/v1/orgs", (None, None, None, 50, 50)),
    OktaRow("custom-authorization-servers", "POST", "/oauth2/default/v1/token",
            (300, 600, 600, 1200, 2000)),
    OktaRow("org-authorization-server", "POST", "/oauth2/v1/token",
            (300, 600, 600, 1200, 2000)),
    OktaRow("oauth2-clients", "GET", "/oauth2/v1/clients/abc", (25, 50, 50, 100, 100)),
    OktaRow("most-other-api", "PATCH", "/api/v1/users", (100, 300, 300, 600, 1200)),
]
# fmt: on

OKTA_CELLS = [
    pytest.param(row, plan, limit, id=f"{row.rule}-{plan}")
    for row in OKTA_TABLE
    for plan, limit in zip(OKTA_PLANS, row.limits, strict=True)
]


def test_okta_table_covers_every_rule(okta: Policy) -> None:
    assert sorted(row.rule for row in OKTA_TABLE) == sorted(rule.name for rule in okta.rules)
    for rule in okta.rules:
        assert rule.algorithm == "fixed-window"
        assert rule.window == 60.0
        assert rule.group == "endpoint"
        assert rule.per == ("tenant",)
        assert rule.description


@pytest.mark.parametrize(("row", "plan", "limit"), OKTA_CELLS)
async def test_okta_table_cell(okta: Policy, row: OktaRow, plan: str, limit: int | None) -> None:
    t = [MINUTE + 3.0]
    guard = Guard(okta, clock=lambda: t[0])
    await guard.tenants.upsert("acme", plan=plan)

    if limit is None:
        denied = await guard.check("acme", row.method, row.path)
        assert denied.status == 403
        assert not denied.allowed
        assert denied.rule == row.rule
        return

    for sent in range(1, limit + 1):
        t[0] += 0.01
        passed = await guard.check("acme", row.method, row.path)
        assert passed.status == 200, f"request {sent} of {limit}"
        assert passed.rule == row.rule
        assert passed.headers["X-Rate-Limit-Remaining"] == str(limit - sent)

    t[0] += 0.01
    denied = await guard.check("acme", row.method, row.path)
    assert denied.status == 429
    assert not denied.allowed
    assert denied.rule == row.rule
    assert denied.headers["X-Rate-Limit-Limit"] == str(limit)
    assert denied.headers["X-Rate-Limit-Remaining"] == "0"
    assert denied.headers["X-Rate-Limit-Reset"] == str(int(NEXT_MINUTE))
    assert "Retry-After" in denied.headers
    assert int(denied.headers["Retry-After"]) >= 1

    t[0] = NEXT_MINUTE
    again = await guard.check("acme", row.method, row.path)
    assert again.status == 200
    assert again.rule == row.rule
    assert again.headers["X-Rate-Limit-Limit"] == str(limit)
    assert again.headers["X-Rate-Limit-Remaining"] == str(limit - 1)
    assert again.headers["X-Rate-Limit-Reset"] == str(int(NEXT_MINUTE + 60))


@pytest.mark.parametrize(
    ("method", "path", "rule"),
    [
        ("GET", "/api/v1/apps", "apps-collection"),
        ("POST", "/api/v1/apps", "apps-collection"),
        ("GET", "/api/v1/apps/0oa123", "app-by-id"),
        ("DELETE", "/api/v1/apps/0oa123", "app-by-id"),
        ("GET", "/api/v1/apps/0oa123/users", "apps-collection"),
        ("GET", "/api/v1/groups", "groups-collection"),
        ("GET", "/api/v1/groups/00g1", "group-by-id"),
        ("PUT", "/api/v1/groups/00g1/users/00u1", "groups-collection"),
        ("GET", "/api/v1/users", "users-collection"),
        ("PATCH", "/api/v1/users", "most-other-api"),
        ("GET", "/api/v1/users/jane@example.com", "user-get"),
        ("POST", "/api/v1/users/00u1", "user-update"),
        ("DELETE", "/api/v1/users/00u1", "user-update"),
        ("PATCH", "/api/v1/users/00u1", "most-other-api"),
        ("POST", "/api/v1/users/00u1/lifecycle/activate", "most-other-api"),
        ("GET", "/api/v1/sessions", "sessions"),
        ("GET", "/api/v1/policies", "most-other-api"),
        ("GET", "/oauth2/aus9s/v1/authorize", "custom-authorization-servers"),
        ("GET", "/oauth2/v1/authorize", "org-authorization-server"),
        ("GET", "/oauth2/v1/clients", "oauth2-clients"),
        ("GET", "/oauth2/v1/clients/abc/tokens", "oauth2-clients"),
    ],
)
async def test_okta_precedence(okta: Policy, method: str, path: str, rule: str) -> None:
    guard = Guard(okta, clock=lambda: MINUTE)
    decision = await guard.check("acme", method, path)
    assert decision.rule == rule
    assert [check.rule for check in decision.checks] == [rule]


@pytest.mark.parametrize(
    "path",
    [
        "/oauth2/v1/keys",
        "/oauth2/default/v1/keys",
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server",
        "/oauth2/default/.well-known/openid-configuration",
        "/oauth2/default/.well-known/oauth-authorization-server",
    ],
)
async def test_okta_public_metadata_is_not_limited(okta: Policy, path: str) -> None:
    guard = Guard(okta, clock=lambda: MINUTE)
    await guard.tenants.upsert("acme", plan="developer-free")
    decision = await guard.check("acme", "GET", path)
    assert decision.checks == ()
    assert decision.status == 200
    assert decision.rule is None
    assert not any(name.lower().startswith("x-rate-limit") for name in decision.headers)
    assert "Retry-After" not in decision.headers


# --- Logto ------------------------------------------------------------------------------

UNLIMITED = "unlimited"
UNAVAILABLE = "unavailable"

# The Dev and Pro tables of logto-system-limits.txt; Enterprise starts from Pro.
LOGTO_DEV: dict[str, int | str] = {
    "access-tokens": 50_000,
    "applications": 100,
    "m2m-applications": 100,
    "third-party-applications": 100,
    "saml-applications": UNAVAILABLE,  # not in the Dev table: a Pro feature
    "api-resources": 100,
    "permissions-per-resource": UNLIMITED,  # not in the Dev table
    "social-connectors": 100,
    "enterprise-sso-connectors": 100,
    "user-roles": 100,
    "m2m-roles": 100,
    "permissions-per-role": 100,
    "organizations": 5_000,
    "users-per-organization": 100_000,
    "organization-user-roles": 1_000,
    "organization-m2m-roles": 100,
    "organization-permissions": 1_000,
    "webhooks": 10,
    "custom-domains": 2,
    "tenant-members": 20,
}
LOGTO_PRO: dict[str, int | str] = {
    "access-tokens": 10_000_000,
    "applications": 100,
    "m2m-applications": 100,
    "third-party-applications": 100,
    "saml-applications": 100,
    "api-resources": 1_000,
    "permissions-per-resource": 1_000,
    "social-connectors": 100,
    "enterprise-sso-connectors": 100,
    "user-roles": 1_000,
    "m2m-roles": 100,
    "permissions-per-role": UNLIMITED,  # not in the Pro table
    "organizations": 100_000,
    "users-per-organization": 100_000,
    "organization-user-roles": 1_000,
    "organization-m2m-roles": 100,
    "organization-permissions": 1_000,
    "webhooks": 10,
    "custom-domains": 10,
    "tenant-members": 100,
}
LOGTO_PLANS = {"dev": LOGTO_DEV, "pro": LOGTO_PRO, "enterprise": LOGTO_PRO}


@pytest.mark.parametrize("plan", list(LOGTO_PLANS))
def test_logto_quotas_match_the_tables(logto: Policy, plan: str) -> None:
    quotas = {quota.name: quota.limits for quota in logto.document.quotas}
    values = {name: limits.get(plan, limits.get("default")) for name, limits in quotas.items()}
    assert values == LOGTO_PLANS[plan]


def test_logto_quota_shapes(logto: Policy) -> None:
    quotas = {quota.name: quota for quota in logto.document.quotas}
    assert {name for name, quota in quotas.items() if quota.period is not None} == {"access-tokens"}
    assert quotas["access-tokens"].period == "month"
    assert {name: quota.per for name, quota in quotas.items() if quota.per is not None} == {
        "users-per-organization": "organization",
        "permissions-per-role": "role",
        "permissions-per-resource": "resource",
    }
    assert {name: quota.counts_toward for name, quota in quotas.items() if quota.counts_toward} == {
        "m2m-applications": ("applications",),
        "third-party-applications": ("applications",),
        "saml-applications": ("applications",),
    }
    assert logto.document.entitlements == {"audit-log-retention": {"default": "14d"}}


def test_logto_tenant_bucket_rule(logto: Policy) -> None:
    (rule,) = logto.rules
    assert rule.name == "tenant-bucket"
    assert rule.group == "tenant"
    assert rule.algorithm == "token-bucket"
    assert rule.window == 10.0
    assert rule.values == (200, 200, 200)


@pytest.mark.parametrize("plan", list(LOGTO_PLANS))
async def test_logto_tenant_bucket(logto: Policy, plan: str) -> None:
    t = [MINUTE + 3.0]
    guard = Guard(logto, clock=lambda: t[0])
    await guard.tenants.upsert("acme", plan=plan)

    for sent in range(1, 201):
        decision = await guard.check("acme", "GET", f"/api/users/{sent}")
        assert decision.status == 200, f"request {sent} of 200"
        assert decision.rule == "tenant-bucket"
        assert decision.remaining == 200 - sent

    denied = await guard.check("acme", "POST", "/oidc/token")
    assert denied.status == 429
    assert denied.rule == "tenant-bucket"
    assert denied.remaining == 0
    assert denied.retry_after == 1  # 50 ms to the next token, rounded up to a whole second
    assert "RateLimit-Policy" in denied.headers

    t[0] += 0.05  # 20 tokens per second: exactly one more
    refilled = await guard.check("acme", "GET", "/api/applications")
    assert refilled.status == 200
    assert refilled.remaining == 0
    assert (await guard.check("acme", "GET", "/api/applications")).status == 429
