"""TenantGuardMiddleware on a Starlette app: headers, refusals per error style, tenant
resolvers, leases released exactly once, and the FastAPI example."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tenantguard import Guard, StoreError, load_policy, parse_policy
from tenantguard.ledger import MemoryLedger, TenantChanges, TenantSnapshot
from tenantguard.middleware import Resolver, TenantGuardMiddleware, TenantSpec, tenant_resolver

MINUTE = 1_700_000_040.0
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
default_plan: free
headers: [HEADERS]
errors: ERRORS
on_store_error: ON_ERROR
rate_limits:
  - name: reports
    match: {paths: [/reports, "/reports/**", "/t/{tenant}/reports"]}
    window: 1m
    limits: {free: 3, pro: 10}
  - name: orgs
    match: {paths: [/orgs]}
    window: 1m
    limits: {free: unavailable, default: 5}
  - name: export
    match: {paths: [/export, /boom, /gone]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 1}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 100}
"""


class Clock:
    def __init__(self, now: float = MINUTE) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingGuard(Guard):
    """A guard that records every lease released, to prove each is released once."""

    released: list[str]

    async def release(self, lease: str | None) -> None:
        if lease is not None:
            self.released.append(lease)
        await super().release(lease)


def make_guard(
    headers: str = "okta", errors: str = "problem+json", on_error: str = "allow", **options: Any
) -> CountingGuard:
    text = POLICY.replace("HEADERS", headers).replace("ERRORS", errors)
    guard = CountingGuard(parse_policy(text.replace("ON_ERROR", on_error)), **options)
    guard.released = []
    return guard


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def boom(request: Request) -> Response:
    raise RuntimeError("the app failed")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    return StreamingResponse(chunks())


ROUTES = [
    Route("/reports", ok),
    Route("/t/{tenant}/reports", ok),
    Route("/orgs", ok),
    Route("/export", stream),
    Route("/boom", boom),
    Route("/public", ok),
]


def client(
    guard: Guard, tenant: TenantSpec[Scope] = "header:X-Tenant-Id", **options: Any
) -> httpx.AsyncClient:
    app = TenantGuardMiddleware(Starlette(routes=ROUTES), guard, tenant=tenant, **options)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.example.com"
    )


ACME = {"X-Tenant-Id": "acme"}


# -- headers on allowed responses ------------------------------------------------------


async def test_okta_headers_on_allowed_responses() -> None:
    async with client(make_guard(clock=Clock())) as http:
        responses = [await http.get("/reports", headers=ACME) for _ in range(3)]
    for left, response in zip((2, 1, 0), responses, strict=True):
        assert response.status_code == 200
        assert response.text == "ok"
        assert int(response.headers["X-Rate-Limit-Limit"]) == 3
        assert int(response.headers["X-Rate-Limit-Remaining"]) == left
        assert int(response.headers["X-Rate-Limit-Reset"]) == int(MINUTE) + 60
        assert "Retry-After" not in response.headers


SF_ITEM = re.compile(r'"(?P<name>[^"]+)"((?:;[a-z]+=\d+)*)')


def parse_sf_list(value: str) -> dict[str, dict[str, int]]:
    """A structured-field list of ``"name";key=int…`` members."""
    members = {}
    for member in value.split(", "):
        match = SF_ITEM.fullmatch(member)
        assert match is not None, member
        params = dict(param.split("=") for param in match.group(2).split(";")[1:])
        members[match.group("name")] = {key: int(number) for key, number in params.items()}
    return members


async def test_ietf_headers_are_structured_fields() -> None:
    clock = Clock(MINUTE + 30)
    async with client(make_guard("ietf", clock=clock)) as http:
        response = await http.get("/reports", headers=ACME)
    policy = parse_sf_list(response.headers["RateLimit-Policy"])
    state = parse_sf_list(response.headers["RateLimit"])
    assert policy == {"reports": {"q": 3, "w": 60}, "tenant-bucket": {"q": 100, "w": 10}}
    assert state["reports"] == {"r": 2, "t": 30}
    assert state["tenant-bucket"]["r"] == 99


async def test_github_headers_with_used_and_resource() -> None:
    async with client(make_guard("github", clock=Clock())) as http:
        await http.get("/reports", headers=ACME)
        response = await http.get("/reports", headers=ACME)
    headers = response.headers
    assert int(headers["x-ratelimit-limit"]) == 3
    assert int(headers["x-ratelimit-remaining"]) == 1
    assert int(headers["x-ratelimit-used"]) == 2
    assert int(headers["x-ratelimit-reset"]) == int(MINUTE) + 60
    assert headers["x-ratelimit-resource"] == "reports"


async def test_headers_in_several_styles_at_once() -> None:
    async with client(make_guard("okta, github", clock=Clock())) as http:
        response = await http.get("/reports", headers=ACME)
    assert response.headers["X-Rate-Limit-Remaining"] == response.headers["x-ratelimit-remaining"]


# -- refusals ----------------------------------------------------------------------------


async def exhaust(http: httpx.AsyncClient, path: str = "/reports") -> httpx.Response:
    for _ in range(3):
        assert (await http.get(path, headers=ACME)).status_code == 200
    return await http.get(path, headers=ACME)


async def test_429_problem_json() -> None:
    clock = Clock(MINUTE + 15)
    async with client(make_guard(clock=clock)) as http:
        response = await exhaust(http)
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Retry-After"] == "45"
    assert response.headers["X-Rate-Limit-Remaining"] == "0"
    body = response.json()
    assert body == {
        "type": "urn:tenantguard:problem:rate_limited",
        "title": "Rate limit exceeded",
        "status": 429,
        "detail": "rate limit 'reports' exceeded",
        "code": "rate_limited",
        "rule": "reports",
        "limit": 3,
        "retry_after": 45,
    }


async def test_429_okta() -> None:
    async with client(make_guard(errors="okta", clock=Clock())) as http:
        first = await exhaust(http)
        second = await http.get("/reports", headers=ACME)
    assert first.status_code == second.status_code == 429
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Retry-After"] == "60"
    body = first.json()
    assert set(body) == {"errorCode", "errorSummary", "errorLink", "errorId", "errorCauses"}
    assert body["errorCode"] == body["errorLink"] == "E0000047"
    assert body["errorSummary"] == "API call exceeded rate limit due to too many requests."
    assert body["errorCauses"] == []
    assert re.fullmatch(r"oae[0-9a-f]{22}", body["errorId"])
    assert second.json()["errorId"] != body["errorId"]


async def test_429_logto() -> None:
    async with client(make_guard(errors="logto", clock=Clock())) as http:
        response = await exhaust(http)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "60"
    assert response.json() == {
        "code": "guard.rate_limit_exceeded",
        "message": "rate limit 'reports' exceeded",
        "data": {
            "rule": "reports",
            "limit": 3,
            "remaining": 0,
            "reset": int(MINUTE) + 60,
            "retry_after": 60,
        },
    }


@pytest.mark.parametrize(
    ("errors", "code"),
    [
        ("problem+json", "not_available"),
        ("okta", "E0000006"),
        ("logto", "guard.not_available"),
    ],
)
async def test_403_for_a_rule_the_plan_lacks(errors: str, code: str) -> None:
    async with client(make_guard(errors=errors, clock=Clock())) as http:
        response = await http.get("/orgs", headers=ACME)
    assert response.status_code == 403
    assert "Retry-After" not in response.headers
    body = response.json()
    assert code in (body.get("code"), body.get("errorCode"))


async def test_a_denied_request_never_reaches_the_app() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        await PlainTextResponse("ok")(scope, receive, send)

    guard = make_guard(clock=Clock())
    middleware = TenantGuardMiddleware(app, guard, tenant="header:X-Tenant-Id")
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
        await exhaust(http)
    assert seen == ["/reports"] * 3


async def test_a_bad_tenant_id_is_a_400_problem_in_every_style() -> None:
    async with client(make_guard(errors="okta", clock=Clock())) as http:
        response = await http.get("/reports", headers={"X-Tenant-Id": "x" * 2000})
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "invalid_request"
    assert "1024" in response.json()["detail"]


class DownLedger(MemoryLedger):
    async def tenant_snapshot(self) -> TenantSnapshot:
        raise StoreError("ledger down")

    async def tenant_changes(self, after: int, *, limit: int = 1000) -> TenantChanges:
        raise StoreError("ledger down")


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_a_ledger_outage_never_refuses_a_check(mode: str) -> None:
    """``on_store_error`` is about the counter store: without the ledger a check is
    counted on the last known tenant state (none here: the default plan)."""
    guard = make_guard(on_error=mode, ledger=DownLedger(), clock=Clock())
    async with client(guard) as http:
        response = await http.get("/reports", headers=ACME)
    assert response.status_code == 200
    assert "X-Rate-Limit-Remaining" in response.headers or "RateLimit" in response.headers
    assert guard.tenant_status().ledger == "loading"


# -- tenant resolvers ----------------------------------------------------------------------


async def remaining(http: httpx.AsyncClient, path: str, **headers: str) -> str | None:
    response = await http.get(path, headers=headers)
    assert response.status_code == 200
    value: str | None = response.headers.get("X-Rate-Limit-Remaining")
    return value


async def test_tenant_from_a_header() -> None:
    async with client(make_guard(clock=Clock()), "header:x-tenant-id") as http:
        assert await remaining(http, "/reports", **{"X-Tenant-Id": "a"}) == "2"
        assert await remaining(http, "/reports", **{"X-Tenant-Id": "a"}) == "1"
        assert await remaining(http, "/reports", **{"X-Tenant-Id": "b"}) == "2"


async def test_tenant_from_the_path() -> None:
    guard = make_guard(clock=Clock())
    await guard.tenants.upsert("pro-co", plan="pro")
    async with client(guard, "path:/t/{tenant}/**") as http:
        assert await remaining(http, "/t/pro-co/reports") == "9"
        assert await remaining(http, "/t/free-co/reports") == "2"
        assert await remaining(http, "/t/free-co/reports") == "1"
        assert await remaining(http, "/public") is None  # outside the pattern: unchecked


async def test_tenant_from_the_host() -> None:
    async with client(make_guard(clock=Clock()), "host:{tenant}.api.example.com") as http:
        for left in ("2", "1"):
            response = await http.get("http://Acme.api.example.com:8080/reports")
            assert response.headers["X-Rate-Limit-Remaining"] == left
        other = await http.get("http://initech.api.example.com/reports")
        assert other.headers["X-Rate-Limit-Remaining"] == "2"
        bare = await http.get("http://api.example.com/reports")
        assert "X-Rate-Limit-Remaining" not in bare.headers


async def test_tenant_from_a_callable() -> None:
    def from_query(scope: Scope) -> str | None:
        query: bytes = scope["query_string"]
        return query.decode().removeprefix("tenant=") or None

    async with client(make_guard(clock=Clock()), from_query) as http:
        assert await remaining(http, "/reports?tenant=acme") == "2"
        assert await remaining(http, "/reports?tenant=acme") == "1"
        assert await remaining(http, "/reports") is None


async def test_no_tenant_passes_through_unchecked() -> None:
    guard = make_guard(clock=Clock())
    async with client(guard) as http:
        for _ in range(10):
            assert await remaining(http, "/reports") is None
        assert await remaining(http, "/reports", **{"X-Tenant-Id": ""}) is None
        assert await remaining(http, "/reports", **ACME) == "2"  # nothing was counted


async def test_default_tenant_counts_the_anonymous() -> None:
    async with client(make_guard(clock=Clock()), default_tenant="anonymous") as http:
        assert await remaining(http, "/reports") == "2"
        assert await remaining(http, "/reports", **{"X-Tenant-Id": "anonymous"}) == "1"


async def test_client_header_keys_per_client_rules() -> None:
    policy = parse_policy(
        "version: 1\nplans: [{name: free, enforcement: hard}]\ndefault_plan: free\n"
        "headers: [okta]\nrate_limits:\n"
        "  - {name: per-client, match: {paths: ['/**']}, per: [tenant, client],"
        " window: 1m, limits: {default: 2}}\n"
    )
    guard = Guard(policy, clock=Clock())
    async with client(guard, client_header="X-Client-Id") as http:
        one = {"X-Tenant-Id": "acme", "X-Client-Id": "one"}
        assert await remaining(http, "/reports", **one) == "1"
        assert await remaining(http, "/reports", **one) == "0"
        assert await remaining(http, "/reports", **{**one, "X-Client-Id": "two"}) == "1"


@pytest.mark.parametrize(
    "spec",
    ["tenant", "cookie:x", "header:", "path:/t/{id}/**", "path:/t/**/{tenant}", "host:api.com"],
)
def test_bad_resolver_specs_name_the_input(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        tenant_resolver(spec)


def test_path_and_host_patterns() -> None:
    path: Resolver[object] = tenant_resolver("path:/t/{tenant}/*/x/**")
    assert path({}, {}, "/t/acme/any/x") == "acme"
    assert path({}, {}, "/t/acme/any/x/deeper/still") == "acme"
    assert path({}, {}, "/t/acme/any/xy") is None
    assert path({}, {}, "/t/acme/x") is None
    host: Resolver[object] = tenant_resolver("host:{tenant}.eu.example.com", default="nobody")
    assert host({}, {"host": "acme.eu.example.com"}, "/") == "acme"
    assert host({}, {"host": "a.b.eu.example.com"}, "/") == "nobody"
    assert host({}, {}, "/") == "nobody"


# -- scopes other than http ------------------------------------------------------------------


async def test_lifespan_and_websocket_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    guard = make_guard(clock=Clock())
    middleware = TenantGuardMiddleware(app, guard, tenant="header:X-Tenant-Id")

    async def receive() -> Message:
        raise AssertionError("not read")

    async def send(message: Message) -> None:
        raise AssertionError("not sent")

    headers = [(b"x-tenant-id", b"acme")]
    await middleware({"type": "lifespan"}, receive, send)
    await middleware({"type": "websocket", "path": "/reports", "headers": headers}, receive, send)
    assert seen == ["lifespan", "websocket"]
    assert (await guard.check("acme", "GET", "/reports")).remaining == 2  # nothing counted


# -- concurrency leases ------------------------------------------------------------------------


async def test_lease_released_after_a_streamed_response() -> None:
    guard = make_guard(clock=Clock())
    async with client(guard) as http:
        for _ in range(3):  # the limit is 1 at a time: each must have been released
            response = await http.get("/export", headers=ACME)
            assert response.status_code == 200
            assert response.text == "ab"
    assert len(guard.released) == 3
    assert len(set(guard.released)) == 3


async def test_lease_released_when_the_app_raises() -> None:
    guard = make_guard(clock=Clock())
    async with client(guard) as http:
        with pytest.raises(RuntimeError, match="the app failed"):
            await http.get("/boom", headers=ACME)
        assert (await http.get("/export", headers=ACME)).status_code == 200
    assert len(guard.released) == 2


async def test_a_second_concurrent_request_is_refused_until_release() -> None:
    guard = make_guard(clock=Clock())
    first = await guard.check("acme", "GET", "/export")
    async with client(guard) as http:
        response = await http.get("/export", headers=ACME)
        assert response.status_code == 429
        await guard.release(first.lease)
        assert (await http.get("/export", headers=ACME)).status_code == 200


async def test_lease_released_once_when_the_client_disconnects() -> None:
    guard = make_guard(clock=Clock())
    during: list[list[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"
        during.append(list(guard.released))  # released by now, before the app returns
        # the slot is free again although this app has not returned
        assert (await guard.check("acme", "GET", "/gone")).allowed

    middleware = TenantGuardMiddleware(app, guard, tenant="header:X-Tenant-Id")
    messages: list[Message] = [
        {"type": "http.request", "body": b"", "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/gone",
        "headers": [(b"x-tenant-id", b"acme")],
        "client": ("203.0.113.9", 5000),
    }
    await middleware(scope, receive, send)
    assert len(during) == 1
    assert len(during[0]) == 1
    assert guard.released == during[0]  # and not again when the app returned
    assert sent == []


async def test_lease_released_once_when_the_response_ends() -> None:
    guard = make_guard(clock=Clock())
    released_at_end: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        assert guard.released == []
        await send({"type": "http.response.body", "body": b"b"})
        released_at_end.append(len(guard.released))

    middleware = TenantGuardMiddleware(app, guard, tenant="header:X-Tenant-Id")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://x"
    ) as http:
        response = await http.get("/export", headers=ACME)
    assert response.text == "ab"
    assert response.headers["X-Rate-Limit-Limit"] == "1"  # the concurrency rule binds
    assert released_at_end == [1]
    assert len(guard.released) == 1


# -- the FastAPI example ------------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_fastapi_example() -> None:
    example = load_example("fastapi_app")
    guard = Guard(load_policy(EXAMPLES / "okta-management.yaml"), clock=Clock())
    transport = httpx.ASGITransport(app=example.create_app(guard))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
        for left in range(19, -1, -1):
            response = await http.get("/api/v1/apps", headers=ACME)
            assert response.status_code == 200
            assert response.headers["X-Rate-Limit-Limit"] == "20"
            assert response.headers["X-Rate-Limit-Remaining"] == str(left)
        denied = await http.get("/api/v1/apps", headers=ACME)
        user = await http.get("/api/v1/users/00u1", headers=ACME)
        health = await http.get("/healthz")
    assert denied.status_code == 429
    assert denied.headers["Retry-After"] == "60"
    assert json.loads(denied.content)["errorCode"] == "E0000047"
    assert user.status_code == 200
    assert user.json() == {"id": "00u1"}
    assert health.status_code == 200
    assert "X-Rate-Limit-Limit" not in health.headers


async def test_a_reloaded_error_style_applies_to_the_next_refusal() -> None:
    guard = make_guard(errors="problem+json", clock=Clock())
    async with client(guard) as http:
        first = await exhaust(http)
        guard.replace_policy(parse_policy(POLICY.replace("HEADERS", "okta").replace(
            "ERRORS", "logto").replace("ON_ERROR", "allow")))  # fmt: skip
        second = await http.get("/reports", headers=ACME)
    assert first.headers["Content-Type"] == "application/problem+json"
    assert first.json()["code"] == "rate_limited"
    assert second.status_code == 429
    assert second.json()["code"] == "guard.rate_limit_exceeded"
