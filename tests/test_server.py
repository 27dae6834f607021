"""HTTP API v1, driven in-process through ASGI with a pinned clock.

Every route's happy path and every error ``code``; roles; body bounds; ids with any
character; readiness. Most tests run on the in-memory ledger, the ones marked by the
``api`` fixture on SQLite as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tenantguard import Guard, StoreError, parse_policy
from tenantguard._api_models import CheckResult, IncreaseOut, LimitsOut, TenantDetail, UsageOut
from tenantguard.server import MAX_BODY_BYTES, create_app

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
  - {name: enterprise, enforcement: contract}
default_plan: free
headers: [okta]
rate_limits:
  - name: apps-item
    match: {paths: ["/api/v1/apps/{id}"]}
    window: 1m
    limits: {free: 2, pro: 100, enterprise: unlimited}
  - name: uploads
    match: {paths: ["/api/v1/uploads"]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 1}
  - name: keyed
    match: {paths: ["/api/v1/keyed"]}
    per: [tenant, "header:x-key"]
    window: 1m
    limits: {default: 1}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 200}
quotas:
  - name: applications
    limits: {free: 2, default: 100}
  - name: users-per-organization
    per: organization
    limits: {default: 3}
  - name: access-tokens
    period: month
    limits: {free: 2, default: 1000}
entitlements:
  audit-log-retention: {default: 14d}
"""

SERVICE_TOKEN = "service-secret"
ADMIN_TOKEN = "admin-secret"
SERVICE = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
START = 1_700_000_040.0  # on a minute boundary, so the window resets 60 s later
CHECK = {"tenant": "acme", "method": "GET", "path": "/api/v1/apps/0oa1"}
PROBLEM = "application/problem+json"

# every route of DESIGN.md's table (and the few this service adds), with its role
ROUTES = [
    ("POST", "/v1/check", "service"),
    ("POST", "/v1/leases/{lease}/release", "service"),
    ("GET", "/v1/tenants", "admin"),
    ("PUT", "/v1/tenants/{tenant}", "admin"),
    ("GET", "/v1/tenants/{tenant}", "admin"),
    ("DELETE", "/v1/tenants/{tenant}", "admin"),
    ("GET", "/v1/tenants/{tenant}/limits", "admin"),
    ("PUT", "/v1/tenants/{tenant}/overrides/{name}", "admin"),
    ("DELETE", "/v1/tenants/{tenant}/overrides/{name}", "admin"),
    ("POST", "/v1/tenants/{tenant}/quotas/{quota}/acquire", "service"),
    ("POST", "/v1/tenants/{tenant}/quotas/{quota}/release", "service"),
    ("GET", "/v1/tenants/{tenant}/quotas/{quota}/usage", "admin"),
    ("PUT", "/v1/tenants/{tenant}/quotas/{quota}/usage", "admin"),
    ("POST", "/v1/tenants/{tenant}/increase-requests", "service"),
    ("GET", "/v1/increase-requests", "admin"),
    ("GET", "/v1/increase-requests/{request_id}", "admin"),
    ("POST", "/v1/increase-requests/{request_id}/approve", "admin"),
    ("POST", "/v1/increase-requests/{request_id}/reject", "admin"),
    ("GET", "/v1/tenants/{tenant}/events", "admin"),
    ("GET", "/metrics", "open"),
    ("GET", "/healthz", "open"),
    ("GET", "/readyz", "open"),
]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_guard(clock: Clock, ledger: str = "memory", counters: str = "memory") -> Guard:
    policy = parse_policy(POLICY, source="policy.yaml")
    return Guard(policy, clock=clock, ledger=ledger, counters=counters)


def open_client(
    guard: Guard, service_token: str = SERVICE_TOKEN, admin_token: str = ADMIN_TOKEN
) -> httpx.AsyncClient:
    app = create_app(guard, service_token=service_token, admin_token=admin_token)
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://tenantguard")


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def guard(clock: Clock) -> AsyncIterator[Guard]:
    guard = make_guard(clock)
    yield guard
    await guard.close()


@pytest.fixture
async def client(guard: Guard) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(guard) as client:
        yield client


@pytest.fixture(params=["memory", "sqlite"])
async def api(
    request: pytest.FixtureRequest, clock: Clock, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the in-memory ledger, then on SQLite."""
    ledger = "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"
    guard = make_guard(clock, ledger)
    async with open_client(guard) as client:
        yield client
    await guard.close()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:tenantguard:problem:{code}"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert "Traceback" not in response.text
    return body


def concrete(path: str) -> str:
    return (
        path.replace("{tenant}", "acme")
        .replace("{lease}", "x.e30")
        .replace("{name}", "apps-item")
        .replace("{quota}", "applications")
        .replace("{request_id}", "ir_0")
    )


def tenant_url(tenant: str, rest: str = "") -> str:
    # dots too, or the client would resolve a ".." segment before sending it
    return f"/v1/tenants/{quote(tenant, safe='').replace('.', '%2E')}{rest}"


# auth and roles -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, role in ROUTES if role != "open"])
async def test_every_guarded_route_needs_a_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, concrete(path), json={})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, role in ROUTES if role == "admin"])
async def test_the_service_token_is_forbidden_on_admin_routes(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, concrete(path), json={}, headers=SERVICE)
    assert_problem(response, 403, "forbidden")


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, role in ROUTES if role == "open"])
async def test_operations_routes_are_open(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", "Bearer service-secre", "Basic service-secret", "service-secret", "Bearer "],
)
async def test_a_wrong_token_is_401(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.post("/v1/check", json=CHECK, headers={"Authorization": authorization})
    assert_problem(response, 401, "unauthorized")
    response = await client.get("/v1/tenants", headers={"Authorization": authorization})
    assert_problem(response, 401, "unauthorized")


async def test_the_admin_token_also_serves_decisions(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/check", json=CHECK, headers=ADMIN)).status_code == 200
    url = "/v1/tenants/acme/quotas/applications/acquire"
    assert (await client.post(url, headers=ADMIN)).status_code == 200


async def test_one_token_for_both_roles(guard: Guard) -> None:
    async with open_client(guard, service_token="only", admin_token="only") as client:
        headers = {"Authorization": "Bearer only"}
        assert (await client.post("/v1/check", json=CHECK, headers=headers)).status_code == 200
        assert (await client.get("/v1/tenants", headers=headers)).status_code == 200


async def test_auth_is_checked_before_the_body_is_read(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/v1/check", content=b"{not json"), 401, "unauthorized")
    big = b"x" * (MAX_BODY_BYTES + 1)
    assert_problem(await client.post("/v1/check", content=big), 401, "unauthorized")


def test_empty_tokens_are_refused() -> None:
    guard = Guard(parse_policy(POLICY))
    with pytest.raises(ValueError, match="non-empty"):
        create_app(guard, service_token="", admin_token=ADMIN_TOKEN)
    with pytest.raises(ValueError, match="non-empty"):
        create_app(guard, service_token=SERVICE_TOKEN, admin_token="")


async def test_tokens_are_never_logged(
    client: httpx.AsyncClient, guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(tenant: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    guard.limits = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG):
        await client.get("/v1/tenants/acme/limits", headers=ADMIN)
        await client.post("/v1/check", json=CHECK, headers=SERVICE)
        await client.get("/v1/tenants", headers={"Authorization": "Bearer guessed-token"})
    assert "boom" in caplog.text
    for secret in (SERVICE_TOKEN, ADMIN_TOKEN, "guessed-token"):
        assert secret not in caplog.text


# decisions ------------------------------------------------------------------------


async def test_check_returns_the_decision(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/check", json=CHECK, headers=SERVICE)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    CheckResult.model_validate(body)  # the documented shape
    assert body["allowed"] is True
    assert body["status"] == 200
    assert (body["tenant"], body["plan"]) == ("acme", "free")
    assert (body["rule"], body["limit"], body["remaining"]) == ("apps-item", 2, 1)
    assert body["reset"] == START + 60
    assert body["retry_after"] is None
    assert body["lease"] is None
    assert body["headers"]["X-Rate-Limit-Remaining"] == "1"
    assert [check["rule"] for check in body["checks"]] == ["apps-item", "tenant-bucket"]
    assert all(check["outcome"] == "allowed" for check in body["checks"])


async def test_check_denies_after_the_limit_and_recovers_when_the_window_resets(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    bodies = []
    for _ in range(3):
        response = await client.post("/v1/check", json=CHECK, headers=SERVICE)
        assert response.status_code == 200  # the request to tenantguard itself succeeded
        bodies.append(response.json())
    assert [body["status"] for body in bodies] == [200, 200, 429]
    denied = bodies[2]
    assert denied["allowed"] is False
    assert (denied["rule"], denied["remaining"], denied["retry_after"]) == ("apps-item", 0, 60)
    assert denied["headers"]["Retry-After"] == "60"
    clock.now += 59
    late = (await client.post("/v1/check", json=CHECK, headers=SERVICE)).json()
    assert (late["status"], late["retry_after"]) == (429, 1)
    clock.now += 1
    assert (await client.post("/v1/check", json=CHECK, headers=SERVICE)).json()["status"] == 200


async def test_tenants_and_methods_are_counted_as_given(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await client.post("/v1/check", json=CHECK, headers=SERVICE)
    other = {**CHECK, "tenant": "globex", "method": "get", "cost": 2}
    body = (await client.post("/v1/check", json=other, headers=SERVICE)).json()
    assert (body["status"], body["tenant"], body["remaining"]) == (200, "globex", 0)


async def test_check_passes_headers_for_header_keyed_rules(client: httpx.AsyncClient) -> None:
    check = {"tenant": "acme", "method": "GET", "path": "/api/v1/keyed"}
    statuses = []
    for key in ["a", "a", "b"]:
        body = {**check, "headers": {"X-Key": key}}
        statuses.append((await client.post("/v1/check", json=body, headers=SERVICE)).json())
    assert [s["status"] for s in statuses] == [200, 429, 200]


async def test_a_lease_is_released_once_and_then_is_a_no_op(client: httpx.AsyncClient) -> None:
    upload = {"tenant": "acme", "method": "POST", "path": "/api/v1/uploads"}
    first = (await client.post("/v1/check", json=upload, headers=SERVICE)).json()
    assert first["status"] == 200
    assert first["lease"]
    assert (await client.post("/v1/check", json=upload, headers=SERVICE)).json()["status"] == 429
    url = f"/v1/leases/{quote(first['lease'], safe='')}/release"
    response = await client.post(url, headers=SERVICE)
    assert response.status_code == 204
    assert response.content == b""
    assert (await client.post(url, headers=SERVICE)).status_code == 204
    assert (await client.post("/v1/check", json=upload, headers=SERVICE)).json()["status"] == 200


@pytest.mark.parametrize("lease", ["garbage", "x.%25%25%25", "abc.W1s", "." + "W" * 1000])
async def test_a_lease_tenantguard_never_issued_is_404(
    client: httpx.AsyncClient, lease: str
) -> None:
    response = await client.post(f"/v1/leases/{lease}/release", headers=SERVICE)
    assert_problem(response, 404, "lease_not_found")


# bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json", b"", b'{"tenant": "acme",', b"\xff\xfe", b"[" * 50_000, b"1" * 5000,
        b'{"tenant": "acme", "method": "GET", "path": "/", "cost": NaN}',
    ],
    ids=["syntax", "empty", "truncated", "not-utf8", "deep", "huge-int", "nan"],
)  # fmt: skip
async def test_malformed_json_is_400(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post("/v1/check", content=content, headers=SERVICE)
    assert_problem(response, 400, "malformed_json")
    response = await client.put("/v1/tenants/acme", content=content, headers=ADMIN)
    assert_problem(response, 400, "malformed_json")


async def test_the_body_is_json_whatever_its_content_type(client: httpx.AsyncClient) -> None:
    for content_type in ["text/plain", "application/x-www-form-urlencoded", ""]:
        headers = {**SERVICE, "Content-Type": content_type}
        response = await client.post("/v1/check", content=httpx_json(CHECK), headers=headers)
        assert response.status_code == 200, content_type


def httpx_json(body: dict[str, Any]) -> bytes:
    return httpx.Request("POST", "/", json=body).content


async def test_missing_tenant_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    body = {"method": "GET", "path": "/api/v1/apps"}
    response = await client.post("/v1/check", json=body, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    assert problem["errors"] == [{"field": "tenant", "message": "Field required"}]
    assert str(problem["detail"]).startswith("tenant: ")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tenant": ""}, "tenant"),
        ({"tenant": 7}, "tenant"),
        ({"tenant": "x" * 1025}, "tenant"),
        ({"tenant": "a\x00b"}, "tenant"),
        ({"tenant": "\ud800"}, "tenant"),
        ({"method": "GET /"}, "method"),
        ({"path": None}, "path"),
        ({"path": "api/v1/apps"}, "path"),
        ({"cost": "1"}, "cost"),
        ({"cost": True}, "cost"),
        ({"cost": 1.5}, "cost"),
        ({"cost": 2**64}, "cost"),
        ({"client": ["a"]}, "client"),
        ({"headers": {"x": 1}}, "headers.x"),
        ({"tennant": "acme"}, "tennant"),
    ],
)
async def test_wrong_fields_are_422_naming_the_field(
    client: httpx.AsyncClient, change: dict[str, object], field: str
) -> None:
    content = json.dumps({**CHECK, **change}).encode()  # ASCII: lone surrogates as \\ud800
    response = await client.post("/v1/check", content=content, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    assert {error["field"] for error in problem["errors"]} == {field}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tenant": ""}, "String should have at least 1 character"),
        ({"path": "api/v1/apps"}, "Value error, must start with /, such as /api/v1/users"),
    ],
)
async def test_field_messages_speak_of_strings(
    client: httpx.AsyncClient, change: dict[str, object], message: str
) -> None:
    response = await client.post("/v1/check", json={**CHECK, **change}, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    assert [error["message"] for error in problem["errors"]] == [message]


@pytest.mark.parametrize("content", [b'[{"tenant": "acme"}]', b'"acme"', b"null", b"3"])
async def test_a_body_that_is_not_an_object_is_422(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post("/v1/check", content=content, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    assert problem["errors"] == [{"field": "body", "message": "must be a JSON object"}]


@pytest.mark.parametrize("cost", [0, -1])
async def test_a_cost_below_one_is_422(client: httpx.AsyncClient, cost: int) -> None:
    response = await client.post("/v1/check", json={**CHECK, "cost": cost}, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    assert "cost" in str(problem["detail"])


# body bounds ----------------------------------------------------------------------


async def test_an_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    body = {**CHECK, "client": "x" * MAX_BODY_BYTES}
    response = await client.post("/v1/check", json=body, headers=SERVICE)
    assert_problem(response, 413, "body_too_large")
    big = {"plan": "pro", "metadata": {"blob": "x" * MAX_BODY_BYTES}}
    response = await client.put("/v1/tenants/acme", json=big, headers=ADMIN)
    assert_problem(response, 413, "body_too_large")


async def test_an_oversize_streamed_body_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"tenant": "acme", "client": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = await client.post("/v1/check", content=chunks(), headers=SERVICE)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body_too_large")


async def test_a_lying_content_length_is_still_bounded(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024

    headers = {**SERVICE, "Content-Length": "10"}
    response = await client.post("/v1/check", content=chunks(), headers=headers)
    assert_problem(response, 413, "body_too_large")


async def test_a_body_just_under_the_bound_is_read(client: httpx.AsyncClient) -> None:
    body: dict[str, Any] = {"plan": "pro", "metadata": {"blob": ""}}
    body["metadata"]["blob"] = "x" * (MAX_BODY_BYTES - len(httpx_json(body)))
    assert len(httpx_json(body)) == MAX_BODY_BYTES
    response = await client.put("/v1/tenants/acme", json=body, headers=ADMIN)
    assert response.status_code == 200


# tenants --------------------------------------------------------------------------


async def test_tenant_lifecycle(api: httpx.AsyncClient, clock: Clock) -> None:
    assert_problem(await api.get("/v1/tenants/acme", headers=ADMIN), 404, "tenant_not_found")
    body = {"plan": "pro", "metadata": {"owner": "ops", "tags": ["a", 1, None, {"b": 2.5}]}}
    response = await api.put("/v1/tenants/acme", json=body, headers=ADMIN)
    assert response.status_code == 200
    created = response.json()
    assert created == {
        "tenant": "acme", "plan": "pro", "metadata": body["metadata"],
        "created_at": START, "updated_at": START,
    }  # fmt: skip
    clock.now += 10
    # omitting metadata keeps it; changing plan keeps everything else
    changed = await api.put("/v1/tenants/acme", json={"plan": "enterprise"}, headers=ADMIN)
    assert changed.json()["metadata"] == body["metadata"]
    assert changed.json()["updated_at"] == START + 10
    detail = (await api.get("/v1/tenants/acme", headers=ADMIN)).json()
    TenantDetail.model_validate(detail)
    assert (detail["plan"], detail["overrides"]) == ("enterprise", [])
    response = await api.delete("/v1/tenants/acme", headers=ADMIN)
    assert response.status_code == 204
    assert_problem(await api.get("/v1/tenants/acme", headers=ADMIN), 404, "tenant_not_found")
    assert_problem(await api.delete("/v1/tenants/acme", headers=ADMIN), 404, "tenant_not_found")


async def test_tenants_are_listed_by_prefix(api: httpx.AsyncClient) -> None:
    for tenant in ["acme-1", "acme-2", "globex", "acme-3"]:
        await api.put(tenant_url(tenant), json={"plan": "pro"}, headers=ADMIN)
    listed = (await api.get("/v1/tenants", headers=ADMIN)).json()["tenants"]
    assert [t["tenant"] for t in listed] == ["acme-1", "acme-2", "acme-3", "globex"]
    params: dict[str, Any] = {"prefix": "acme-", "limit": 2}
    page = (await api.get("/v1/tenants", params=params, headers=ADMIN)).json()["tenants"]
    assert [t["tenant"] for t in page] == ["acme-1", "acme-2"]
    bads: list[dict[str, Any]] = [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"prefix": "\x00"}]
    for bad in bads:
        response = await api.get("/v1/tenants", params=bad, headers=ADMIN)
        problem = assert_problem(response, 422, "invalid_request")
        assert problem["errors"][0]["field"] == next(iter(bad))


async def test_an_unknown_plan_is_422(client: httpx.AsyncClient) -> None:
    response = await client.put("/v1/tenants/acme", json={"plan": "gold"}, headers=ADMIN)
    problem = assert_problem(response, 422, "unknown_plan")
    assert "gold" in problem["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "plan"),
        ({"plan": 1}, "plan"),
        ({"plan": "pro", "metadata": []}, "metadata"),
        ({"plan": "pro", "metadata": {"a": "\x00"}}, "metadata"),
        ({"plan": "pro", "metadata": {"a": 2**60}}, "metadata"),
        ({"plan": "pro", "metadata": {"a": json.loads("[" * 40 + "]" * 40)}}, "metadata"),
        ({"plan": "pro", "extra": 1}, "extra"),
    ],
)
async def test_a_wrong_tenant_body_is_422_naming_the_field(
    api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await api.put("/v1/tenants/acme", json=body, headers=ADMIN)
    problem = assert_problem(response, 422, "invalid_request")
    assert {error["field"] for error in problem["errors"]} == {field}


@pytest.mark.parametrize(
    "tenant",
    ["a/b", "a/limits", "{acme}", "ünïcødé ✓", "100%", "%2F", "..", "a?b#c", "x" * 1024, " "],
)
async def test_tenant_ids_may_hold_any_character(api: httpx.AsyncClient, tenant: str) -> None:
    url = tenant_url(tenant)
    assert (await api.put(url, json={"plan": "pro"}, headers=ADMIN)).status_code == 200
    got = (await api.get(url, headers=ADMIN)).json()
    assert (got["tenant"], got["plan"]) == (tenant, "pro")
    limits = (await api.get(tenant_url(tenant, "/limits"), headers=ADMIN)).json()
    assert (limits["tenant"], limits["plan"]) == (tenant, "pro")
    listed = (await api.get("/v1/tenants", headers=ADMIN)).json()["tenants"]
    assert [t["tenant"] for t in listed] == [tenant]
    acquire = tenant_url(tenant, "/quotas/applications/acquire")
    assert (await api.post(acquire, headers=SERVICE)).json()["used"] == 1


async def test_an_id_that_could_address_another_route_stays_an_id(
    client: httpx.AsyncClient,
) -> None:
    await client.put(tenant_url("a/limits"), json={"plan": "pro"}, headers=ADMIN)
    # the tenant "a", not "a/limits", has no record; its limits are the default plan's
    assert_problem(await client.get("/v1/tenants/a", headers=ADMIN), 404, "tenant_not_found")
    assert (await client.get("/v1/tenants/a/limits", headers=ADMIN)).json()["plan"] == "free"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("x" * 1025, "at most 1024"),
        ("%FF", "UTF-8"),
        ("a%00b", "NUL"),
        ("%C3", "UTF-8"),
    ],
)
async def test_a_bad_tenant_in_the_path_is_422_naming_it(
    client: httpx.AsyncClient, raw: str, message: str
) -> None:
    response = await client.get(f"/v1/tenants/{raw}", headers=ADMIN)
    problem = assert_problem(response, 422, "invalid_request")
    assert problem["errors"][0]["field"] == "tenant"
    assert message in problem["detail"]


async def test_an_empty_tenant_segment_is_no_route(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/tenants/", headers=ADMIN), 404, "not_found")
    assert_problem(await client.get("/v1/tenants//limits", headers=ADMIN), 404, "not_found")


# limits and overrides -------------------------------------------------------------


async def test_limits_show_every_rate_limit_quota_and_entitlement(
    api: httpx.AsyncClient,
) -> None:
    await api.post("/v1/tenants/acme/quotas/applications/acquire", headers=SERVICE)
    body = {"scope": "org-1", "amount": 2}
    url = "/v1/tenants/acme/quotas/users-per-organization/acquire"
    await api.post(url, json=body, headers=SERVICE)
    response = await api.get("/v1/tenants/acme/limits", headers=ADMIN)
    limits = response.json()
    LimitsOut.model_validate(limits)
    assert (limits["plan"], limits["enforcement"]) == ("free", "hard")
    rates = {rate["name"]: rate for rate in limits["rate_limits"]}
    assert set(rates) == {"apps-item", "uploads", "keyed", "tenant-bucket"}
    assert (rates["apps-item"]["value"], rates["apps-item"]["source"]) == (2, "plan")
    quotas = {quota["name"]: quota for quota in limits["quotas"]}
    assert (quotas["applications"]["used"], quotas["applications"]["limit"]) == (1, 2)
    assert quotas["users-per-organization"]["usage"] == [{"scope": "org-1", "used": 2}]
    assert quotas["access-tokens"]["period"] == "month"
    assert limits["entitlements"] == {"audit-log-retention": "14d"}


async def test_overrides_raise_and_lower_limits(api: httpx.AsyncClient) -> None:
    await api.put("/v1/tenants/acme", json={"plan": "pro"}, headers=ADMIN)
    url = "/v1/tenants/acme/overrides/apps-item"
    response = await api.put(url, json={"value": 500, "reason": "launch"}, headers=ADMIN)
    assert response.status_code == 200
    record = response.json()
    assert (record["name"], record["value"], record["multiplier"]) == ("apps-item", 500, None)
    assert (record["reason"], record["created_by"], record["created_at"]) == (
        "launch", "admin", START,
    )  # fmt: skip
    body = {"multiplier": 3, "reason": "x3", "expires_at": START + 3600}
    assert (
        await api.put("/v1/tenants/acme/overrides/applications", json=body, headers=ADMIN)
    ).status_code == 200
    limits = (await api.get("/v1/tenants/acme/limits", headers=ADMIN)).json()
    rate = next(r for r in limits["rate_limits"] if r["name"] == "apps-item")
    quota = next(q for q in limits["quotas"] if q["name"] == "applications")
    assert (rate["value"], rate["source"]) == (500, "override")
    assert (quota["limit"], quota["source"]) == (300, "override")
    detail = (await api.get("/v1/tenants/acme", headers=ADMIN)).json()
    assert {o["name"] for o in detail["overrides"]} == {"apps-item", "applications"}
    decision = (await api.post("/v1/check", json=CHECK, headers=SERVICE)).json()
    assert [c["limit"] for c in decision["checks"] if c["rule"] == "apps-item"] == [500]
    assert (await api.delete(url, headers=ADMIN)).status_code == 204
    assert_problem(await api.delete(url, headers=ADMIN), 404, "override_not_found")


async def test_a_hard_plan_refuses_a_raising_override(client: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/overrides/apps-item"
    response = await client.put(url, json={"value": 500, "reason": "no"}, headers=ADMIN)
    problem = assert_problem(response, 409, "override_refused")
    assert "hard plan" in problem["detail"]
    lower = await client.put(url, json={"value": 1, "reason": "abuse"}, headers=ADMIN)
    assert lower.status_code == 200


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        ({"value": 5, "multiplier": 2, "reason": "both"}, "invalid_request", 422),
        ({"reason": "neither"}, "invalid_request", 422),
        ({"value": 5, "reason": "  "}, "invalid_request", 422),
        ({"value": 5, "reason": "old", "expires_at": START - 1}, "invalid_request", 422),
        ({"value": -1, "reason": "negative"}, "invalid_request", 422),
        ({"multiplier": 0, "reason": "zero"}, "invalid_request", 422),
        ({"multiplier": 1e300, "reason": "huge"}, "invalid_request", 422),
        ({"value": 5}, "invalid_request", 422),
    ],
)
async def test_a_wrong_override_is_422(
    client: httpx.AsyncClient, body: dict[str, Any], code: str, status: int
) -> None:
    await client.put("/v1/tenants/acme", json={"plan": "pro"}, headers=ADMIN)
    url = "/v1/tenants/acme/overrides/apps-item"
    assert_problem(await client.put(url, json=body, headers=ADMIN), status, code)


async def test_an_override_of_an_unknown_limit_is_404(client: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/overrides/nothing"
    response = await client.put(url, json={"value": 1, "reason": "x"}, headers=ADMIN)
    assert_problem(response, 404, "limit_not_found")


# quotas ---------------------------------------------------------------------------


async def test_entity_cap_acquire_release_and_exceed(api: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/quotas/applications"
    first = await api.post(f"{url}/acquire", headers=SERVICE)  # no body: amount 1
    assert first.status_code == 200
    UsageOut.model_validate(first.json())
    assert (first.json()["used"], first.json()["limit"], first.json()["remaining"]) == (1, 2, 1)
    assert (await api.post(f"{url}/acquire", json={}, headers=SERVICE)).json()["used"] == 2
    over = await api.post(f"{url}/acquire", json={"amount": 1}, headers=SERVICE)
    problem = assert_problem(over, 403, "quota_exceeded")
    assert (problem["quota"], problem["limit"], problem["used"], problem["requested"]) == (
        "applications", 2, 2, 1,
    )  # fmt: skip
    released = await api.post(f"{url}/release", json={"amount": 2}, headers=SERVICE)
    assert released.json()["used"] == 0
    assert (await api.post(f"{url}/release", headers=SERVICE)).json()["used"] == 0


async def test_a_usage_quota_over_its_period_is_429(api: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/quotas/access-tokens/acquire"
    body = (await api.post(url, json={"amount": 2}, headers=SERVICE)).json()
    assert (body["used"], body["period"]) == (2, "2023-11")
    problem = assert_problem(await api.post(url, headers=SERVICE), 429, "usage_exceeded")
    assert (problem["quota"], problem["limit"], problem["used"], problem["requested"]) == (
        "access-tokens", 2, 2, 1,
    )  # fmt: skip
    assert problem["resets_at"] == 1_701_388_800.0  # 2023-12-01T00:00:00Z


async def test_an_idempotency_key_counts_once(api: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/quotas/applications/acquire"
    body = {"idempotency_key": "req-1"}
    assert (await api.post(url, json=body, headers=SERVICE)).json()["used"] == 1
    assert (await api.post(url, json=body, headers=SERVICE)).json()["used"] == 1


async def test_scoped_quotas_need_their_scope(client: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/quotas/users-per-organization/acquire"
    problem = assert_problem(await client.post(url, headers=SERVICE), 422, "invalid_request")
    assert "scope" in problem["detail"]
    body = {"scope": "org-1", "amount": 3}
    assert (await client.post(url, json=body, headers=SERVICE)).json()["used"] == 3
    other = {"scope": "org-2"}
    assert (await client.post(url, json=other, headers=SERVICE)).json()["used"] == 1
    scoped = "/v1/tenants/acme/quotas/applications/acquire"
    response = await client.post(scoped, json={"scope": "org-1"}, headers=SERVICE)
    assert_problem(response, 422, "invalid_request")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": "1"}, "amount"),
        ({"amount": 2**53}, "amount"),
        ({"scope": ""}, "scope"),
        ({"idempotency_key": 5}, "idempotency_key"),
        ({"amout": 1}, "amout"),
    ],
)
async def test_a_wrong_quota_body_is_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    url = "/v1/tenants/acme/quotas/applications/acquire"
    problem = assert_problem(
        await client.post(url, json=body, headers=SERVICE), 422, "invalid_request"
    )
    assert {error["field"] for error in problem["errors"]} == {field}


async def test_an_unknown_quota_is_404(client: httpx.AsyncClient) -> None:
    for method, rest in [("POST", "acquire"), ("POST", "release"), ("PUT", "usage")]:
        url = f"/v1/tenants/acme/quotas/nothing/{rest}"
        headers = ADMIN if method == "PUT" else SERVICE
        response = await client.request(method, url, json={"used": 1}, headers=headers)
        if method != "PUT":
            response = await client.request(method, url, headers=headers)
        assert_problem(response, 404, "quota_not_found")
    url = "/v1/tenants/acme/quotas/nothing/usage"
    assert_problem(await client.get(url, headers=ADMIN), 404, "quota_not_found")


async def test_usage_is_reconciled_and_read(api: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/quotas/applications/usage"
    response = await api.put(url, json={"used": 7}, headers=ADMIN)
    assert response.status_code == 200
    assert (response.json()["used"], response.json()["remaining"]) == (7, 0)
    assert (await api.get(url, headers=ADMIN)).json()["used"] == 7
    acquire = "/v1/tenants/acme/quotas/applications/acquire"
    assert_problem(await api.post(acquire, headers=SERVICE), 403, "quota_exceeded")
    scoped = "/v1/tenants/acme/quotas/users-per-organization/usage"
    await api.put(scoped, json={"used": 2, "scope": "org-1"}, headers=ADMIN)
    got = await api.get(scoped, params={"scope": "org-1"}, headers=ADMIN)
    assert (got.json()["used"], got.json()["scope"]) == (2, "org-1")
    for bad in [{"used": -1}, {"used": 1.5}, {}]:
        assert_problem(await api.put(url, json=bad, headers=ADMIN), 422, "invalid_request")


# increase requests ----------------------------------------------------------------

INCREASE = {
    "limit": "apps-item",
    "requested": 1000,
    "reason": "launch week",
    "avg_rps": 5.5,
    "peak_rps": 40,
    "burst_pattern": "mornings",
    "endpoints": ["/api/v1/apps/{id}"],
    "needed_by": "2023-12-01",
}


async def test_increase_request_is_filed_listed_and_approved(api: httpx.AsyncClient) -> None:
    await api.put("/v1/tenants/acme", json={"plan": "pro"}, headers=ADMIN)
    url = "/v1/tenants/acme/increase-requests"
    response = await api.post(url, json=INCREASE, headers=SERVICE)
    assert response.status_code == 201
    filed = response.json()
    IncreaseOut.model_validate(filed)
    assert (filed["status"], filed["tenant"], filed["requested"]) == ("pending", "acme", 1000)
    assert filed["endpoints"] == ["/api/v1/apps/{id}"]
    request_id = filed["id"]
    listed = (await api.get("/v1/increase-requests", headers=ADMIN)).json()["requests"]
    assert [r["id"] for r in listed] == [request_id]
    params = {"status": "approved"}
    assert (await api.get("/v1/increase-requests", params=params, headers=ADMIN)).json() == {
        "requests": []
    }
    got = (await api.get(f"/v1/increase-requests/{request_id}", headers=ADMIN)).json()
    assert got == filed
    body = {"value": 800, "reason": "ok for launch", "expires_at": START + 86400}
    response = await api.post(
        f"/v1/increase-requests/{request_id}/approve", json=body, headers=ADMIN
    )
    approved = response.json()
    assert (approved["status"], approved["approved_value"]) == ("approved", 800)
    assert approved["approved_expires_at"] == START + 86400
    limits = (await api.get("/v1/tenants/acme/limits", headers=ADMIN)).json()
    rate = next(r for r in limits["rate_limits"] if r["name"] == "apps-item")
    assert (rate["value"], rate["source"]) == (800, "override")
    again = await api.post(f"/v1/increase-requests/{request_id}/approve", headers=ADMIN)
    assert_problem(again, 409, "request_already_decided")
    reject = {"reason": "too late"}
    response = await api.post(
        f"/v1/increase-requests/{request_id}/reject", json=reject, headers=ADMIN
    )
    assert_problem(response, 409, "request_already_decided")


async def test_an_increase_request_is_approved_as_asked_or_rejected(
    client: httpx.AsyncClient,
) -> None:
    await client.put("/v1/tenants/acme", json={"plan": "pro"}, headers=ADMIN)
    url = "/v1/tenants/acme/increase-requests"
    minimal = {"limit": "applications", "requested": 150, "reason": "growth"}
    first = (await client.post(url, json=minimal, headers=SERVICE)).json()
    second = (await client.post(url, json=minimal, headers=SERVICE)).json()
    approved = (
        await client.post(f"/v1/increase-requests/{first['id']}/approve", headers=ADMIN)
    ).json()
    assert (approved["status"], approved["approved_value"]) == ("approved", 150)
    missing = await client.post(
        f"/v1/increase-requests/{second['id']}/reject", json={}, headers=ADMIN
    )
    problem = assert_problem(missing, 422, "invalid_request")
    assert problem["errors"][0]["field"] == "reason"
    response = await client.post(
        f"/v1/increase-requests/{second['id']}/reject", json={"reason": "not now"}, headers=ADMIN
    )
    rejected = response.json()
    assert (rejected["status"], rejected["decision_reason"]) == ("rejected", "not now")
    params = {"status": "rejected", "tenant": "acme"}
    listed = (await client.get("/v1/increase-requests", params=params, headers=ADMIN)).json()
    assert [r["id"] for r in listed["requests"]] == [second["id"]]


async def test_an_increase_on_a_hard_plan_is_rejected_at_once(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/tenants/acme/increase-requests", json=INCREASE, headers=SERVICE
    )
    assert response.status_code == 201
    assert response.json()["status"] == "rejected"
    assert "upgrade" in response.json()["decision_reason"]


async def test_increase_request_errors(client: httpx.AsyncClient) -> None:
    url = "/v1/tenants/acme/increase-requests"
    unknown = {**INCREASE, "limit": "nothing"}
    assert_problem(await client.post(url, json=unknown, headers=SERVICE), 404, "limit_not_found")
    for bad, field in [
        ({**INCREASE, "requested": 0}, "requested"),
        ({**INCREASE, "avg_rps": "fast"}, "avg_rps"),
        ({**INCREASE, "endpoints": "/x"}, "endpoints"),
        ({k: v for k, v in INCREASE.items() if k != "reason"}, "reason"),
    ]:
        problem = assert_problem(
            await client.post(url, json=bad, headers=SERVICE), 422, "invalid_request"
        )
        assert problem["errors"][0]["field"] == field
    for path in ["/v1/increase-requests/ir_nope", "/v1/increase-requests/ir_nope/approve"]:
        method = "GET" if path.endswith("nope") else "POST"
        response = await client.request(method, path, headers=ADMIN)
        assert_problem(response, 404, "request_not_found")
    response = await client.post(
        "/v1/increase-requests/ir_nope/reject", json={"reason": "x"}, headers=ADMIN
    )
    assert_problem(response, 404, "request_not_found")
    bad_status = await client.get("/v1/increase-requests", params={"status": "open"}, headers=ADMIN)
    assert_problem(bad_status, 422, "invalid_request")


async def test_approving_after_a_downgrade_to_a_hard_plan_is_refused(
    client: httpx.AsyncClient,
) -> None:
    await client.put("/v1/tenants/acme", json={"plan": "pro"}, headers=ADMIN)
    filed = (
        await client.post("/v1/tenants/acme/increase-requests", json=INCREASE, headers=SERVICE)
    ).json()
    await client.put("/v1/tenants/acme", json={"plan": "free"}, headers=ADMIN)
    response = await client.post(f"/v1/increase-requests/{filed['id']}/approve", headers=ADMIN)
    assert_problem(response, 409, "override_refused")


# events ---------------------------------------------------------------------------


async def test_events_list_changes_and_violations(api: httpx.AsyncClient, clock: Clock) -> None:
    await api.put("/v1/tenants/acme", json={"plan": "pro"}, headers=ADMIN)
    clock.now += 1
    override = {"value": 1, "reason": "abuse"}
    await api.put("/v1/tenants/acme/overrides/apps-item", json=override, headers=ADMIN)
    clock.now += 1
    for _ in range(2):
        await api.post("/v1/check", json=CHECK, headers=SERVICE)
    url = "/v1/tenants/acme/events"
    events = (await api.get(url, headers=ADMIN)).json()["events"]
    assert [(e["kind"], e["name"]) for e in events] == [
        ("violation", "apps-item"),
        ("warning", "apps-item"),
        ("override_set", "apps-item"),
        ("plan_changed", "pro"),
    ]
    assert events[2]["data"]["reason"] == "abuse"
    params: dict[str, Any] = {"kind": ["plan_changed", "violation"], "limit": 1}
    only = (await api.get(url, params=params, headers=ADMIN)).json()["events"]
    assert [e["kind"] for e in only] == ["violation"]
    since = (await api.get(url, params={"since": START + 1}, headers=ADMIN)).json()["events"]
    assert [e["kind"] for e in since] == ["violation", "warning", "override_set"]
    bads: list[dict[str, Any]] = [{"kind": "nothing"}, {"limit": 0}, {"since": "soon"}]
    for bad in bads:
        assert_problem(await api.get(url, params=bad, headers=ADMIN), 422, "invalid_request")


# operations -----------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.json() == {"status": "ok"}


async def test_readyz_names_the_policy(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "policy": "policy.yaml", "reload_error": None}


async def test_readyz_is_503_when_the_ledger_is_down_before_any_tenant_state_loaded(
    client: httpx.AsyncClient, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # once the state is loaded, a ledger outage leaves it ready: test_server_readiness.py
    loading = SimpleNamespace(ledger="loading", stale_seconds=None, tenants=0, stale_checks=0)
    monkeypatch.setattr(guard, "tenant_status", lambda: loading)
    await guard.ledger.close()
    problem = assert_problem(await client.get("/readyz"), 503, "not_ready")
    assert problem["checks"] == {"ledger": "down"}
    assert "ledger" in problem["detail"]
    assert problem["policy"] == "policy.yaml"


async def test_readyz_pings_a_redis_counter_store(clock: Clock, redis_url: str) -> None:
    guard = make_guard(clock, counters=redis_url)
    async with open_client(guard) as client:
        assert (await client.get("/readyz")).status_code == 200
    await guard.close()


async def test_readyz_is_503_when_the_counter_store_is_down(clock: Clock) -> None:
    guard = make_guard(clock, counters="redis://127.0.0.1:1/0")  # nothing listens there
    async with open_client(guard) as client:
        problem = assert_problem(await client.get("/readyz"), 503, "not_ready")
    assert problem["checks"] == {"ledger": "ok", "counters": "down"}
    assert "counters down" in problem["detail"]
    await guard.close()


async def test_readyz_reports_a_failed_policy_reload(
    client: httpx.AsyncClient, guard: Guard
) -> None:
    guard.reload_error = "policy.yaml:3: plans: expected a list"
    response = await client.get("/readyz")
    # still serving the last good policy: ready, and saying what went wrong
    assert response.status_code == 200
    assert response.json()["reload_error"] == "policy.yaml:3: plans: expected a list"


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "tenantguard_events_dropped_total" in response.text


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing"), 404, "not_found")
    response = await client.get("/v1/check", headers=SERVICE)
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_problem(await client.get("/v1/tenants/"), 404, "not_found")  # no redirect


async def test_an_unexpected_error_is_a_logged_500_without_details(
    client: httpx.AsyncClient, guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(tenant: str) -> dict[str, Any]:
        raise RuntimeError("secret internals")

    guard.limits = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="tenantguard.server"):
        response = await client.get("/v1/tenants/acme/limits", headers=ADMIN)
    problem = assert_problem(response, 500, "internal_error")
    assert "secret internals" not in response.text
    assert problem["detail"] == "the server could not answer this request"
    assert "secret internals" in caplog.text
    assert "/v1/tenants/{tenant}/limits" in caplog.text


async def test_a_ledger_failure_is_503(client: httpx.AsyncClient, guard: Guard) -> None:
    async def down(tenant: str) -> None:
        raise StoreError("ledger down")

    guard.ledger.get_tenant = down  # type: ignore[method-assign]
    response = await client.get("/v1/tenants/acme", headers=ADMIN)
    assert_problem(response, 503, "store_unavailable")
    assert response.headers["retry-after"] == "1"


async def test_the_lifespan_closes_the_guard(guard: Guard) -> None:
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    async with app.router.lifespan_context(app):
        assert await guard.ledger.ping()
    assert not await guard.ledger.ping()


# the OpenAPI document -------------------------------------------------------------


@pytest.fixture
def openapi(guard: Guard) -> dict[str, Any]:
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    return app.openapi()


async def test_openapi_is_served_openly(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json()["info"]["title"] == "tenantguard"


def test_openapi_lists_every_route_and_its_role(openapi: dict[str, Any]) -> None:
    documented = {
        (method.upper(), path)
        for path, operations in openapi["paths"].items()
        for method in operations
    }
    assert documented == {(method, path) for method, path, _ in ROUTES}
    for method, path, role in ROUTES:
        operation = openapi["paths"][path][method.lower()]
        if role == "open":
            assert "security" not in operation
            continue
        assert operation["security"] == [{"bearer": []}]
        assert role in operation["description"]
        assert "401" in operation["responses"]
        if role == "admin":
            assert "403" in operation["responses"]
    assert openapi["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }


def test_openapi_documents_bodies_answers_and_problems(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    for model in ["CheckBody", "CheckResult", "TenantBody", "TenantDetail", "OverrideBody",
                  "QuotaChangeBody", "UsageBody", "UsageOut", "IncreaseBody", "IncreaseOut",
                  "ApproveBody", "RejectBody", "EventList", "LimitsOut", "Problem"]:  # fmt: skip
        assert model in schemas, model
    assert "HTTPValidationError" not in schemas
    check = openapi["paths"]["/v1/check"]["post"]
    body_schema = check["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/CheckBody"}
    ok = check["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/CheckResult"}
    assert {"400", "401", "413", "422"} <= set(check["responses"])
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    content = response["content"]
                    assert list(content) == [PROBLEM], (method, path, status)
    acquire = openapi["paths"]["/v1/tenants/{tenant}/quotas/{quota}/acquire"]["post"]
    assert {"403", "404", "429"} <= set(acquire["responses"])
    assert not acquire["requestBody"].get("required", False)
