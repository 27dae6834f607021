"""Readiness and ledger outages at the HTTP edge.

The guard's tenant state is pinned with a stand-in ``tenant_status`` (what the engine
reports is its own tests' business); the ledger is taken down for real by closing it,
and ``LedgerUnavailable`` is raised where the engine would raise it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tenantguard import Guard
from tenantguard.errors import LedgerUnavailable, StoreError
from tenantguard.server import create_app
from test_server import ADMIN, ADMIN_TOKEN, SERVICE, SERVICE_TOKEN, Clock, assert_problem
from test_server import make_guard as make_server_guard

ANONYMOUS_READY = {"status": "ready", "policy": "policy.yaml", "reload_error": None}


@pytest.fixture
async def guard() -> AsyncIterator[Guard]:
    guard = make_server_guard(Clock(1_700_000_040.0))
    yield guard
    await guard.close()


@pytest.fixture
async def client(guard: Guard) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantguard") as client:
        yield client


def pin_status(
    monkeypatch: pytest.MonkeyPatch, guard: Guard, ledger: str, stale: float | None, tenants: int
) -> None:
    """What ``guard.tenant_status()`` says from now on (``stale`` is None until the state
    was read once)."""
    status = SimpleNamespace(ledger=ledger, stale_seconds=stale, tenants=tenants, stale_checks=7)
    monkeypatch.setattr(guard, "tenant_status", lambda: status)


# readiness ------------------------------------------------------------------------


async def test_a_ledger_outage_keeps_a_loaded_replica_ready(
    client: httpx.AsyncClient, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_status(monkeypatch, guard, "down", 42.5, 3)
    await guard.ledger.close()
    anonymous = await client.get("/readyz")
    assert anonymous.status_code == 200
    assert anonymous.json() == ANONYMOUS_READY  # no details without the admin token
    as_service = await client.get("/readyz", headers=SERVICE)
    assert as_service.json() == ANONYMOUS_READY
    admin = await client.get("/readyz", headers=ADMIN)
    assert admin.status_code == 200
    assert admin.json() == {
        **ANONYMOUS_READY,
        "checks": {"ledger": "down"},
        "tenant_state": {"ledger": "down", "stale_seconds": 42.5, "tenants": 3},
    }


async def test_the_admin_token_sees_the_state_when_all_is_well(
    client: httpx.AsyncClient, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_status(monkeypatch, guard, "ok", 0.0, 12)
    body = (await client.get("/readyz", headers=ADMIN)).json()
    assert body["checks"] == {"ledger": "ok"}
    assert body["tenant_state"] == {"ledger": "ok", "stale_seconds": 0.0, "tenants": 12}
    wrong = await client.get("/readyz", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 200  # an open route: a wrong token is only anonymous
    assert wrong.json() == ANONYMOUS_READY


async def test_a_replica_still_loading_is_ready_while_the_ledger_answers(
    client: httpx.AsyncClient, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_status(monkeypatch, guard, "loading", None, 0)
    response = await client.get("/readyz", headers=ADMIN)
    assert response.status_code == 200  # the first check loads the state
    assert response.json()["tenant_state"] == {
        "ledger": "loading", "stale_seconds": None, "tenants": 0,
    }  # fmt: skip


async def test_no_tenant_state_and_no_ledger_is_not_ready(
    client: httpx.AsyncClient, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_status(monkeypatch, guard, "loading", None, 0)
    await guard.ledger.close()
    anonymous = assert_problem(await client.get("/readyz"), 503, "not_ready")
    assert anonymous["checks"] == {"ledger": "down"}
    assert "tenant_state" not in anonymous
    assert "no tenant state" in anonymous["detail"]
    admin = assert_problem(await client.get("/readyz", headers=ADMIN), 503, "not_ready")
    assert admin["tenant_state"] == {"ledger": "loading", "stale_seconds": None, "tenants": 0}


async def test_counters_down_is_not_ready_whatever_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guard = make_server_guard(Clock(1_700_000_040.0), counters="redis://127.0.0.1:1/0")
    pin_status(monkeypatch, guard, "down", 5.0, 1)
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tg") as client:
        problem = assert_problem(await client.get("/readyz", headers=ADMIN), 503, "not_ready")
    await guard.close()
    assert problem["checks"] == {"ledger": "ok", "counters": "down"}
    assert problem["detail"] == "counters down"
    assert problem["tenant_state"]["ledger"] == "down"


# the lifespan ---------------------------------------------------------------------


async def test_the_lifespan_starts_the_guard_before_serving(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    async def start() -> None:
        calls.append("start")

    monkeypatch.setattr(guard, "start", start)
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    async with app.router.lifespan_context(app):
        assert calls == ["start"]


async def test_a_ledger_down_at_start_up_does_not_stop_the_service(
    guard: Guard, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def start() -> None:
        raise LedgerUnavailable("connection refused")

    monkeypatch.setattr(guard, "start", start)
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    async with app.router.lifespan_context(app):
        pass
    assert "connection refused" in caplog.text


# ledger_unavailable ---------------------------------------------------------------


def unavailable(retry_after: Any) -> LedgerUnavailable:
    error = LedgerUnavailable("the ledger did not answer")
    error.retry_after = retry_after
    return error


@pytest.mark.parametrize(
    ("method", "url", "call", "headers"),
    [
        ("POST", "/v1/tenants/acme/quotas/applications/acquire", "quotas.acquire", SERVICE),
        ("POST", "/v1/tenants/acme/quotas/applications/release", "quotas.release", SERVICE),
        ("PUT", "/v1/tenants/acme", "tenants.upsert", ADMIN),
        ("GET", "/v1/tenants/acme/limits", "limits", ADMIN),
        ("POST", "/v1/tenants/acme/increase-requests", "increase_requests.file", SERVICE),
    ],
)
async def test_a_ledger_outage_is_503_ledger_unavailable_with_retry_after(
    client: httpx.AsyncClient,
    guard: Guard,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    url: str,
    call: str,
    headers: dict[str, str],
) -> None:
    async def down(*args: object, **kwargs: object) -> None:
        raise unavailable(2.2)

    owner: Any = guard
    *path, name = call.split(".")
    for part in path:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, name, down)
    body: dict[str, Any] | None = {"plan": "pro"} if method == "PUT" else None
    if call == "increase_requests.file":
        body = {"limit": "apps-item", "requested": 10, "reason": "launch"}
    response = await client.request(method, url, json=body, headers=headers)
    problem = assert_problem(response, 503, "ledger_unavailable")
    assert response.headers["retry-after"] == "3"  # whole seconds, rounded up
    assert problem["retry_after"] == 3


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (59.5, "60"), (float("nan"), "1"), (-5, "1"),
     (float("inf"), "3600"), (10**9, "3600"), ("soon", "1")],
)  # fmt: skip
async def test_retry_after_is_whole_seconds_at_least_one(
    client: httpx.AsyncClient,
    guard: Guard,
    monkeypatch: pytest.MonkeyPatch,
    retry_after: Any,
    header: str,
) -> None:
    async def down(*args: object, **kwargs: object) -> None:
        raise unavailable(retry_after)

    monkeypatch.setattr(guard.quotas, "acquire", down)
    url = "/v1/tenants/acme/quotas/applications/acquire"
    response = await client.post(url, headers=SERVICE)
    assert_problem(response, 503, "ledger_unavailable")
    assert response.headers["retry-after"] == header


async def test_a_plain_store_error_keeps_its_own_code(
    client: httpx.AsyncClient, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*args: object, **kwargs: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(guard.quotas, "acquire", down)
    response = await client.post("/v1/tenants/acme/quotas/applications/acquire", headers=SERVICE)
    assert_problem(response, 503, "store_unavailable")


def test_openapi_documents_ledger_unavailable(guard: Guard) -> None:
    app = create_app(guard, service_token=SERVICE_TOKEN, admin_token=ADMIN_TOKEN)
    document = app.openapi()
    for path in [
        "/v1/tenants/{tenant}/quotas/{quota}/acquire",
        "/v1/tenants/{tenant}/quotas/{quota}/release",
    ]:
        assert (
            "ledger_unavailable"
            in document["paths"][path]["post"]["responses"]["503"]["description"]
        )
    assert "503" not in document["paths"]["/v1/check"]["post"]["responses"]
    schemas = document["components"]["schemas"]
    assert "ledger_unavailable" in schemas["Problem"]["properties"]["code"]["description"]
    assert set(schemas["Readiness"]["properties"]) == {
        "status", "policy", "reload_error", "checks", "tenant_state",
    }  # fmt: skip
