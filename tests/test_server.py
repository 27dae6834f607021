"""The HTTP decision service, driven in-process through ASGI with a pinned clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tenantguard import Guard, parse_policy
from tenantguard.server import MAX_BODY_BYTES, create_app

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
default_plan: free
headers: [okta]
rate_limits:
  - name: apps-item
    match: {paths: ["/api/v1/apps/{id}"]}
    window: 1m
    limits: {free: 2, pro: 100}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 200}
"""

SERVICE = {"Authorization": "Bearer service-secret"}
START = 1_700_000_040.0  # on a minute boundary, so the window resets 60 s later
CHECK = {"tenant": "acme", "method": "GET", "path": "/api/v1/apps/0oa1"}
PROBLEM = "application/problem+json"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def client(clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    guard = Guard(parse_policy(POLICY, source="policy.yaml"), clock=clock)
    app = create_app(guard, service_token="service-secret", admin_token="admin-secret")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantguard") as client:
        yield client


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:tenantguard:problem:{code}"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


# auth -----------------------------------------------------------------------------


async def test_check_without_a_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/check", json=CHECK)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", "Bearer service-secre", "Basic service-secret", "service-secret", "Bearer "],
)
async def test_check_with_a_wrong_token_is_401(
    client: httpx.AsyncClient, authorization: str
) -> None:
    response = await client.post("/v1/check", json=CHECK, headers={"Authorization": authorization})
    assert_problem(response, 401, "unauthorized")


async def test_the_admin_token_may_also_ask_for_decisions(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer admin-secret"}
    response = await client.post("/v1/check", json=CHECK, headers=headers)
    assert response.status_code == 200


async def test_auth_is_checked_before_the_body_is_read(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/check", content=b"{not json")
    assert_problem(response, 401, "unauthorized")


def test_empty_tokens_are_refused() -> None:
    guard = Guard(parse_policy(POLICY))
    with pytest.raises(ValueError, match="non-empty"):
        create_app(guard, service_token="", admin_token="admin-secret")


# decisions ------------------------------------------------------------------------


async def test_check_returns_the_decision(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/check", json=CHECK, headers=SERVICE)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) >= {
        "allowed", "status", "tenant", "plan", "rule", "limit", "remaining", "reset",
        "retry_after", "headers", "checks", "lease",
    }  # fmt: skip
    assert body["allowed"] is True
    assert body["status"] == 200
    assert body["tenant"] == "acme"
    assert body["plan"] == "free"
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
    assert (denied["rule"], denied["remaining"]) == ("apps-item", 0)
    assert denied["retry_after"] == 60
    assert denied["headers"]["Retry-After"] == "60"

    clock.now += 59
    late = (await client.post("/v1/check", json=CHECK, headers=SERVICE)).json()
    assert (late["status"], late["retry_after"]) == (429, 1)
    clock.now += 1
    again = (await client.post("/v1/check", json=CHECK, headers=SERVICE)).json()
    assert again["status"] == 200


async def test_tenants_and_methods_are_counted_as_given(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await client.post("/v1/check", json=CHECK, headers=SERVICE)
    other = {**CHECK, "tenant": "globex", "method": "get", "cost": 2}
    body = (await client.post("/v1/check", json=other, headers=SERVICE)).json()
    assert (body["status"], body["tenant"], body["remaining"]) == (200, "globex", 0)


# bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"tenant": "acme",', b"\xff\xfe", b"[" * 50_000, b"1" * 5000],
    ids=["syntax", "empty", "truncated", "not-utf8", "deep", "huge-int"],
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post("/v1/check", content=content, headers=SERVICE)
    assert_problem(response, 400, "malformed_json")


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
        ({"method": "GET /"}, "method"),
        ({"path": None}, "path"),
        ({"cost": "1"}, "cost"),
        ({"cost": True}, "cost"),
        ({"client": ["a"]}, "client"),
        ({"tennant": "acme"}, "tennant"),
    ],
)
async def test_wrong_fields_are_422_naming_the_field(
    client: httpx.AsyncClient, change: dict[str, object], field: str
) -> None:
    response = await client.post("/v1/check", json={**CHECK, **change}, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert {error["field"] for error in errors} == {field}


@pytest.mark.parametrize("content", [b'[{"tenant": "acme"}]', b'"acme"', b"null", b"3"])
async def test_a_body_that_is_not_an_object_is_422(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post("/v1/check", content=content, headers=SERVICE)
    assert_problem(response, 422, "invalid_request")


@pytest.mark.parametrize("cost", [0, -1])
async def test_a_cost_below_one_is_422(client: httpx.AsyncClient, cost: int) -> None:
    response = await client.post("/v1/check", json={**CHECK, "cost": cost}, headers=SERVICE)
    problem = assert_problem(response, 422, "invalid_request")
    assert "cost" in str(problem["detail"])


async def test_an_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    body = {**CHECK, "client": "x" * MAX_BODY_BYTES}
    response = await client.post("/v1/check", json=body, headers=SERVICE)
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


async def test_a_body_just_under_the_bound_is_read(client: httpx.AsyncClient) -> None:
    padding = MAX_BODY_BYTES - len(httpx.Request("POST", "/", json=CHECK).content) - 20
    body = {**CHECK, "client": "x" * padding}
    response = await client.post("/v1/check", json=body, headers=SERVICE)
    assert response.status_code == 200


# other routes ---------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_names_the_policy(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.json() == {"status": "ready", "policy": "policy.yaml"}


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing"), 404, "not_found")
    assert_problem(await client.get("/v1/check", headers=SERVICE), 405, "method_not_allowed")
