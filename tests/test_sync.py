"""SyncGuard (the guard's own coroutines, driven without a loop or on its loop thread),
TenantGuardWSGI, and the Flask example."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.util import setup_testing_defaults

import pytest

from tenantguard import Decision, Guard, QuotaExceeded, TenantRecord, load_policy, parse_policy
from tenantguard.ledger import MemoryLedger, TenantSnapshot
from tenantguard.sync import SyncGuard, TenantGuardWSGI

MINUTE = 1_700_000_040.0
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOOP_THREAD = "tenantguard-sync"

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
default_plan: free
headers: [okta, ietf, github]
errors: ERRORS
rate_limits:
  - name: reports
    match: {paths: ["/reports/**"]}
    window: 1m
    limits: {free: 3, pro: 100}
  - name: orgs
    match: {paths: ["/orgs"]}
    window: 1m
    limits: {free: unavailable, default: 5}
  - name: search
    match: {paths: ["/search"]}
    per: [tenant, client]
    algorithm: sliding-window
    window: 10s
    limits: {default: 2}
  - name: export
    match: {paths: ["/export", "/boom"]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 1}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 20}
quotas:
  - name: applications
    limits: {free: 2, pro: 10}
"""


class Clock:
    def __init__(self, now: float = MINUTE) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NotingGuard(Guard):
    """A guard that notes the thread each check and upsert finished in."""

    threads: set[str]

    async def check(self, *args: Any, **kwargs: Any) -> Decision:
        decision = await super().check(*args, **kwargs)
        self.threads.add(threading.current_thread().name)
        return decision

    def seen(self) -> set[str]:
        seen, self.threads = self.threads, set()
        return seen


def make(errors: str = "problem+json", **options: Any) -> tuple[NotingGuard, Clock]:
    clock = options.pop("clock", None) or Clock()
    policy = parse_policy(POLICY.replace("ERRORS", errors))
    guard = NotingGuard(policy, clock=clock, **options)
    guard.threads = set()
    return guard, clock


def comparable(decision: Decision) -> dict[str, Any]:
    shape = decision.as_dict()
    shape["lease"] = shape["lease"] is not None  # lease ids are random
    return shape


# -- SyncGuard ---------------------------------------------------------------------------


def test_same_traffic_same_decisions_as_the_async_guard() -> None:
    rng = random.Random(7)
    traffic = [
        (
            rng.choice(["acme", "initech", "pro-co"]),
            rng.choice(["GET", "POST"]),
            rng.choice(["/reports/1", "/orgs", "/search", "/export", "/x"]),
            rng.choice(["c1", "c2"]),
            rng.random() * 3,
        )
        for _ in range(400)
    ]

    async def drive_async() -> list[dict[str, Any]]:
        guard, clock = make()
        await guard.tenants.upsert("pro-co", plan="pro")
        shapes = []
        for index, (tenant, method, path, client, step) in enumerate(traffic):
            clock.now += step
            decision = await guard.check(tenant, method, path, client=client)
            shapes.append(comparable(decision))
            if index % 2:
                await guard.release(decision.lease)
        await guard.close()
        return shapes

    def drive_sync() -> list[dict[str, Any]]:
        guard, clock = make()
        with SyncGuard(guard) as sync:
            sync.tenants.upsert("pro-co", plan="pro")
            shapes = []
            for index, (tenant, method, path, client, step) in enumerate(traffic):
                clock.now += step
                decision = sync.check(tenant, method, path, client=client)
                shapes.append(comparable(decision))
                if index % 2:
                    sync.release(decision.lease)
        assert guard.seen() == {"MainThread"}  # memory stores: never left this thread
        return shapes

    expected = asyncio.run(drive_async())
    assert drive_sync() == expected
    statuses = {shape["status"] for shape in expected}
    assert statuses == {200, 403, 429}  # the traffic exercised every answer


def test_the_api_objects_work_without_await() -> None:
    guard, _ = make()
    with SyncGuard(guard) as sync:
        record = sync.tenants.upsert("acme", plan="pro", metadata={"region": "eu"})
        assert isinstance(record, TenantRecord)
        assert sync.tenants.get("acme") == record
        assert [r.tenant for r in sync.tenants.list()] == ["acme"]
        assert sync.quotas.acquire("acme", "applications").used == 1
        assert sync.quotas.get("acme", "applications").remaining == 9
        sync.overrides.set("acme", "reports", value=7, reason="launch week")
        assert sync.check("acme", "GET", "/reports/1").limit == 7
        assert [o.name for o in sync.overrides.list("acme")] == ["reports"]
        assert sync.overrides.remove("acme", "reports")
        limits = sync.limits("acme")
        assert limits["plan"] == "pro"
        assert sync.quotas.release("acme", "applications").used == 0
        assert sync.tenants.delete("acme")
        sync.quotas.acquire("initech", "applications", amount=2)
        with pytest.raises(QuotaExceeded):
            sync.quotas.acquire("initech", "applications")
        with pytest.raises(ValueError, match="non-empty"):
            sync.check("", "GET", "/x")


def test_from_many_threads_admits_exactly_the_limit() -> None:
    guard, _ = make()
    with SyncGuard(guard) as sync:
        sync.tenants.upsert("pro-co", plan="pro")
        sync.overrides.set("pro-co", "tenant-bucket", value=1000, reason="load test")
        start = threading.Barrier(8)

        def burst(_: int) -> int:
            start.wait()  # eight threads at once, not one pool thread after another
            return sum(sync.check("pro-co", "GET", "/reports/1").allowed for _ in range(40))

        with ThreadPoolExecutor(8) as pool:
            admitted = sum(pool.map(burst, range(8)))
        assert admitted == 100  # 320 tries, 100 a minute on pro
        assert len(guard.seen()) == 8  # every call ran in its caller's thread

        # a concurrency lease taken and released from several threads: one holder at most
        lock = threading.Lock()
        holders: list[int] = []

        def hold(_: int) -> int:
            held = 0
            for _ in range(50):
                decision = sync.check("pro-co", "GET", "/export")
                if decision.allowed:
                    held += 1
                    with lock:
                        holders.append(1)
                        assert len(holders) == 1
                        holders.pop()
                    sync.release(decision.lease)
            return held

        with ThreadPoolExecutor(4) as pool:
            assert sum(pool.map(hold, range(4))) >= 50


def test_the_first_check_reads_the_directory_on_the_loop_then_never_again(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    writer, _ = make(ledger=url)
    with SyncGuard(writer) as sync:
        sync.tenants.upsert("acme", plan="pro")
    guard, _ = make(ledger=url)
    with SyncGuard(guard) as sync:
        assert sync.check("acme", "GET", "/reports/1").plan == "pro"
        assert guard.seen() == {LOOP_THREAD}  # tried here, done on the loop
        assert sync.check("globex", "GET", "/reports/1").plan == "free"
        assert guard.seen() == {"MainThread"}


def test_writes_from_many_threads_at_once_all_apply() -> None:
    guard, _ = make()
    with SyncGuard(guard) as sync:

        def write(worker: int) -> None:
            for index in range(50):
                sync.tenants.upsert(f"t{worker}-{index}", plan="pro")

        threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads switch mid-write, as under load
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert guard.tenant_status().tenants == 400
        assert sync.check("t7-49", "GET", "/reports/1").plan == "pro"
        events = sync.wrap(guard.ledger.events)("t3-3", kinds=["plan_changed"])
    assert len(events) == 1


def test_with_an_sqlite_ledger_io_runs_on_the_loop_thread(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    guard, _ = make(ledger=url)
    with SyncGuard(guard) as sync:
        sync.tenants.upsert("acme", plan="pro")  # on the loop; reads the directory too
        assert guard.seen() == set()
        cold = sync.check("acme", "GET", "/reports/1")  # the tenant is in memory already
        assert cold.plan == "pro"
        assert [(c.rule, c.remaining) for c in cold.checks] == [
            ("reports", 99),
            ("tenant-bucket", 19),
        ]
        assert guard.seen() == {"MainThread"}  # no I/O, no hop
        warm = sync.check("acme", "GET", "/reports/1")
        assert warm.checks[0].remaining == 98
        assert guard.seen() == {"MainThread"}
        for _ in range(10):
            sync.quotas.acquire("acme", "applications")
        with pytest.raises(QuotaExceeded, match="10 of 10"):
            sync.quotas.acquire("acme", "applications")
        for _ in range(3):
            sync.check("initech", "GET", "/reports/1")
        assert not sync.check("initech", "GET", "/reports/1").allowed  # a violation event
    # everything reached the database, events emitted in this thread included
    reopened, _ = make(ledger=url)

    async def read() -> tuple[int, list[str]]:
        usage = await reopened.quotas.get("acme", "applications")
        events = await reopened.ledger.events("initech")
        await reopened.close()
        return usage.used, [event.kind for event in events]

    used, kinds = asyncio.run(read())
    assert used == 10
    assert "violation" in kinds


class PausingLedger(MemoryLedger):
    """A ledger whose read pauses once (a bare yield), as a cooperative driver might."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed_in: list[str] = []

    async def tenant_snapshot(self) -> TenantSnapshot:
        await asyncio.sleep(0)
        self.resumed_in.append(threading.current_thread().name)
        return await super().tenant_snapshot()


def test_a_paused_coroutine_is_finished_on_the_loop_not_restarted() -> None:
    ledger = PausingLedger()
    guard, _ = make(ledger=ledger)
    with SyncGuard(guard) as sync:
        first = sync.check("acme", "GET", "/reports/1")  # reads the tenant directory
        second = sync.check("acme", "GET", "/reports/1")  # from memory: never pauses
        third = sync.check("acme", "GET", "/reports/1")
    assert (first.remaining, second.remaining, third.remaining) == (2, 1, 0)  # once each
    assert ledger.resumed_in == [LOOP_THREAD]
    assert guard.seen() == {"MainThread", LOOP_THREAD}


async def test_refuses_to_block_a_running_loop() -> None:
    guard, _ = make()
    sync = SyncGuard(guard)
    with pytest.raises(RuntimeError, match="await the Guard"):
        sync.check("acme", "GET", "/reports/1")
    await guard.close()


# -- TenantGuardWSGI -------------------------------------------------------------------------


class Started:
    def __init__(self) -> None:
        self.status = ""
        self.headers: dict[str, str] = {}

    def __call__(self, status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
        self.status, self.headers = status, dict(headers)
        return lambda data: None


def environ(path: str, **headers: str) -> WSGIEnvironment:
    env: WSGIEnvironment = {"PATH_INFO": path, "REMOTE_ADDR": "203.0.113.9"}
    setup_testing_defaults(env)
    env.update({"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()})
    return env


class Body:
    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"ok"

    def close(self) -> None:
        self.closed = True


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("the app failed")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Body()


def wsgi(errors: str = "problem+json", **options: Any) -> tuple[TenantGuardWSGI, SyncGuard]:
    guard, _ = make(errors)
    sync = SyncGuard(guard)
    options.setdefault("tenant", "header:X-Tenant-Id")
    return TenantGuardWSGI(hello, sync, **options), sync


def test_wsgi_headers_and_refusal() -> None:
    app, sync = wsgi("logto")
    for left in ("2", "1", "0"):
        started = Started()
        assert list(app(environ("/reports/1", x_tenant_id="acme"), started)) == [b"ok"]
        assert started.status == "200 OK"
        assert started.headers["X-Rate-Limit-Remaining"] == left
        assert started.headers["x-ratelimit-resource"] == "reports"
        assert started.headers["RateLimit"].startswith('"reports";r=' + left)
    started = Started()
    body = b"".join(app(environ("/reports/1", x_tenant_id="acme"), started))
    assert started.status == "429 Too Many Requests"
    assert started.headers["Retry-After"] == "60"
    assert b'"code":"guard.rate_limit_exceeded"' in body
    started = Started()
    app(environ("/orgs", x_tenant_id="acme"), started)
    assert started.status == "403 Forbidden"
    started = Started()
    body = b"".join(app(environ("/reports/1", x_tenant_id="x" * 2000), started))
    assert started.status == "400 Bad Request"
    assert started.headers["Content-Type"] == "application/problem+json"
    sync.close()


def test_wsgi_without_a_tenant_passes_through_unchecked() -> None:
    app, sync = wsgi()
    for _ in range(5):
        started = Started()
        app(environ("/reports/1"), started)
        assert started.status == "200 OK"
        assert "X-Rate-Limit-Limit" not in started.headers
    sync.close()


def test_wsgi_tenant_from_a_utf8_path_and_the_host() -> None:
    app, sync = wsgi(tenant="path:/t/{tenant}/**")
    started = Started()
    path = "/t/café/reports/1".encode().decode("latin-1")  # as PEP 3333 hands it over
    app(environ(path), started)
    assert started.headers["X-Rate-Limit-Remaining"] == "19"
    assert sync.check("café", "GET", "/t/café/reports/1").remaining == 18
    sync.close()
    app, sync = wsgi(tenant="host:{tenant}.example.com")
    started = Started()
    app(environ("/reports/1", host="acme.example.com:8000"), started)
    assert started.headers["X-Rate-Limit-Remaining"] == "2"
    assert sync.check("acme", "GET", "/reports/1").remaining == 1
    sync.close()


def test_wsgi_lease_released_when_the_body_is_closed_once() -> None:
    app, sync = wsgi()
    released: list[str | None] = []
    release = sync.release

    def counting(lease: str | None) -> None:
        released.append(lease)
        release(lease)

    sync.release = counting
    first = app(environ("/export", x_tenant_id="acme"), Started())
    assert list(first) == [b"ok"]
    busy = Started()
    app(environ("/export", x_tenant_id="acme"), busy)
    assert busy.status.startswith("429")  # the first still holds the only slot
    closing = getattr(first, "close")  # noqa: B009 - the WSGI server's call
    closing()
    closing()
    assert len(released) == 1
    again = Started()
    body = app(environ("/export", x_tenant_id="acme"), again)
    assert again.status == "200 OK"
    getattr(body, "close")()  # noqa: B009
    assert len(released) == 2
    with pytest.raises(RuntimeError, match="the app failed"):
        app(environ("/boom", x_tenant_id="acme"), Started())
    assert len(released) == 3
    assert None not in released
    assert len(set(released)) == 3
    sync.close()


# -- the Flask example -----------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flask_example() -> None:
    example = load_example("flask_app")
    guard = Guard(load_policy(EXAMPLES / "okta-management.yaml"), clock=Clock())
    client = example.create_app(guard).test_client()
    for left in range(19, -1, -1):
        response = client.get("/api/v1/apps", headers={"X-Tenant-Id": "initech"})
        assert response.status_code == 200
        assert response.headers["X-Rate-Limit-Limit"] == "20"
        assert response.headers["X-Rate-Limit-Remaining"] == str(left)
    denied = client.get("/api/v1/apps", headers={"X-Tenant-Id": "initech"})
    assert denied.status_code == 429
    assert denied.headers["Retry-After"] == "60"
    assert denied.json is not None
    assert denied.json["errorCode"] == "E0000047"
    paid = client.get("/api/v1/apps", headers={"X-Tenant-Id": "acme"})
    assert paid.headers["X-Rate-Limit-Limit"] == "25"  # the example's paying tenant
    health = client.get("/healthz")
    assert health.status_code == 200
    assert "X-Rate-Limit-Limit" not in health.headers


def test_wsgi_follows_a_reloaded_error_style() -> None:
    app, sync = wsgi("problem+json")
    for _ in range(3):
        app(environ("/reports/1", x_tenant_id="acme"), Started())
    started = Started()
    body = b"".join(app(environ("/reports/1", x_tenant_id="acme"), started))
    assert b'"code":"rate_limited"' in body
    sync.guard.replace_policy(parse_policy(POLICY.replace("ERRORS", "okta")))
    started = Started()
    body = b"".join(app(environ("/reports/1", x_tenant_id="acme"), started))
    assert started.status == "429 Too Many Requests"
    assert b'"errorCode":"E0000047"' in body
    sync.close()
