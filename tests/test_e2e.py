"""End to end: ``tenantguard serve`` as real processes on loopback, driven with httpx.

Two replicas share one real Redis (counters, server clock) and one real PostgreSQL
(ledger), as DESIGN.md's deployment does; every test starts its own pair on free ports
and stops them, whatever happens. What one replica counts, the other sees: a rate limit
and a quota are enforced once across both, and a tenant written through one is read
by the other within the documented tenant-cache bound (2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from servers import free_port

TENANTGUARD = Path(sys.executable).parent / "tenantguard"
ADMIN = "e2e-admin-token"
SERVICE = "e2e-service-token"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SIGTERM_EXIT_WITHIN = 5.0
TENANT_CACHE_BOUND = 2.0  # README: through another replica within 2 s
PORT_ATTEMPTS = 3

# ``shared`` is a token bucket of N per day: it refills one token every 8640 s, so no test
# sees a refill and exactly N requests pass, however the traffic falls on the clock.
N = 10
CAP = 7
POLICY = f"""\
version: 1
plans:
  - {{name: free, enforcement: hard}}
  - {{name: pro, enforcement: soft}}
default_plan: free
headers: [okta, ietf]
rate_limits:
  - name: shared
    match: {{paths: ["/api/v1/shared/**"]}}
    algorithm: token-bucket
    window: 1d
    limits: {{free: {N}, pro: {N * 2}}}
  - name: items
    match: {{methods: [GET], paths: ["/api/v1/items/{{id}}"]}}
    algorithm: token-bucket
    window: 1d
    limits: {{free: 100000, pro: 200000}}
quotas:
  - name: applications
    limits: {{free: {CAP}, pro: 50}}
"""


class Replica:
    """One ``tenantguard serve`` process on a free loopback port, output to a log file."""

    def __init__(self, name: str, directory: Path, policy: Path, counters: str, ledger: str):
        self.name = name
        self.directory = directory
        self.policy = policy
        self.counters = counters
        self.ledger = ledger
        self.log_path = directory / f"{name}.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGUARD_")}
        env["TENANTGUARD_ADMIN_TOKEN"] = ADMIN
        env["TENANTGUARD_SERVICE_TOKEN"] = SERVICE
        argv = [
            str(TENANTGUARD), "serve",
            "--policy", str(self.policy),
            "--port", str(self.port),
            "--counters", self.counters,
            "--ledger", self.ledger,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log.write(f"--- {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                start_new_session=True,  # our own group, so cleanup reaches any child
            )

    def wait_ready(self) -> bool:
        """Poll /healthz until it answers 200; False if the process exited first."""
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        return True
                if time.monotonic() >= deadline:
                    self.stop()
                    pytest.fail(f"{self.name} not healthy in {STARTUP_TIMEOUT:g} s\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return f"last lines of {self.log_path}:\n" + "\n".join(text.splitlines()[-40:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the group after a bound; the exit status (None if none)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode


class Pair:
    """Two replicas on one Redis and one PostgreSQL; clients with the service and admin
    tokens for each."""

    def __init__(self, directory: Path, counters: str, ledger: str) -> None:
        policy = directory / "policy.yaml"
        policy.write_text(POLICY)
        self.replicas = [Replica(name, directory, policy, counters, ledger) for name in ("a", "b")]

    def start(self) -> Self:
        # both at once, as a deployment rolls out: they share the ledger's migrations
        pending = list(self.replicas)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            for replica in pending:
                replica.spawn()
            failed = [replica for replica in pending if not replica.wait_ready()]
            if not failed:
                return self
            for replica in failed:
                in_use = "address already in use" in replica.log().lower()
                replica.stop()
                if not in_use or attempt == PORT_ATTEMPTS:
                    pytest.fail(f"replica {replica.name} exited at startup\n{replica.log()}")
            pending = failed
        return self

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    @property
    def a(self) -> Replica:
        return self.replicas[0]

    @property
    def b(self) -> Replica:
        return self.replicas[1]


@pytest.fixture
def pair(tmp_path: Path, redis_url: str, postgres_url: str) -> Iterator[Pair]:
    replicas = Pair(tmp_path, f"{redis_url}?clock=server", postgres_url)
    try:
        yield replicas.start()
    finally:
        replicas.stop()


def service(replica: Replica) -> httpx.Client:
    return httpx.Client(
        base_url=replica.url, headers={"Authorization": f"Bearer {SERVICE}"}, timeout=10.0
    )


def admin(replica: Replica) -> httpx.Client:
    return httpx.Client(
        base_url=replica.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10.0
    )


def check(client: httpx.Client, tenant: str, path: str, method: str = "GET") -> dict[str, Any]:
    response = client.post("/v1/check", json={"tenant": tenant, "method": method, "path": path})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- one replica ---------------------------------------------------------------------


def test_a_check_is_answered_with_the_decision_and_its_headers(pair: Pair) -> None:
    with service(pair.a) as client:
        first = check(client, "acme", "/api/v1/shared/x")
        assert first["allowed"] is True
        assert first["status"] == 200
        assert first["tenant"] == "acme"
        assert first["plan"] == "free"
        assert first["rule"] == "shared"
        assert first["limit"] == N
        assert first["remaining"] == N - 1
        assert first["degraded"] is False
        assert first["retry_after"] is None
        assert first["headers"]["X-Rate-Limit-Limit"] == str(N)
        assert first["headers"]["X-Rate-Limit-Remaining"] == str(N - 1)
        assert "RateLimit" in first["headers"]
        assert "RateLimit-Policy" in first["headers"]
        assert [c["rule"] for c in first["checks"]] == ["shared"]
        assert first["checks"][0]["outcome"] == "allowed"

        for _ in range(N - 1):
            assert check(client, "acme", "/api/v1/shared/x")["allowed"] is True
        denied = check(client, "acme", "/api/v1/shared/x")
        assert denied["allowed"] is False
        assert denied["status"] == 429
        assert denied["remaining"] == 0
        assert denied["retry_after"] > 0
        assert denied["headers"]["Retry-After"] == str(denied["retry_after"])

        # the wrong token is refused; the service token may not use admin routes
        refused = client.post(
            "/v1/check",
            json={"tenant": "acme", "method": "GET", "path": "/"},
            headers={"Authorization": "Bearer nope"},
        )
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert client.put("/v1/tenants/acme", json={"plan": "pro"}).status_code == 403

    with httpx.Client(base_url=pair.a.url, timeout=5.0) as anonymous:
        assert anonymous.get("/readyz").status_code == 200


def test_sigterm_stops_a_replica_promptly_with_status_0(pair: Pair) -> None:
    process = pair.a.process
    assert process is not None
    with service(pair.a) as client:
        assert check(client, "acme", "/api/v1/items/1")["allowed"] is True
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=SIGTERM_EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {SIGTERM_EXIT_WITHIN:g} s after SIGTERM\n{pair.a.log()}")
    assert status == 0, pair.a.log()
    assert time.monotonic() - started < SIGTERM_EXIT_WITHIN
    # the other replica is unaffected
    with service(pair.b) as client:
        assert check(client, "acme", "/api/v1/items/1")["allowed"] is True


# --- two replicas, one Redis, one PostgreSQL -----------------------------------------


def test_two_replicas_alternating_enforce_one_limit_together(pair: Pair) -> None:
    with service(pair.a) as a, service(pair.b) as b:
        decisions = [
            check(client, "acme", "/api/v1/shared/x") for _ in range(N * 2) for client in (a, b)
        ]
    allowed = [d for d in decisions if d["allowed"]]
    assert len(allowed) == N
    # the first N pass, one after another, whichever replica answered
    assert all(d["allowed"] for d in decisions[:N])
    assert [d["remaining"] for d in allowed] == list(range(N - 1, -1, -1))
    assert all(d["status"] == 429 for d in decisions[N:])


async def test_two_replicas_under_concurrent_traffic_admit_exactly_the_limit(pair: Pair) -> None:
    headers = {"Authorization": f"Bearer {SERVICE}"}
    body = {"tenant": "globex", "method": "POST", "path": "/api/v1/shared/upload"}
    async with (
        httpx.AsyncClient(base_url=pair.a.url, headers=headers, timeout=10.0) as a,
        httpx.AsyncClient(base_url=pair.b.url, headers=headers, timeout=10.0) as b,
    ):
        responses = await asyncio.gather(
            *(client.post("/v1/check", json=body) for _ in range(N * 3) for client in (a, b))
        )
    assert all(r.status_code == 200 for r in responses)
    assert sum(r.json()["allowed"] for r in responses) == N
    assert not any(r.json()["degraded"] for r in responses)


def test_a_tenant_upserted_through_one_replica_is_seen_by_the_other(pair: Pair) -> None:
    with service(pair.b) as b_service, admin(pair.a) as a_admin, admin(pair.b) as b_admin:
        # B caches the unknown tenant on the default plan
        assert check(b_service, "initech", "/api/v1/items/1")["plan"] == "free"
        put = a_admin.put("/v1/tenants/initech", json={"plan": "pro", "metadata": {"k": "v"}})
        assert put.status_code == 200, put.text
        written = time.monotonic()

        # the ledger is shared: B's admin read sees it at once
        got = b_admin.get("/v1/tenants/initech")
        assert got.status_code == 200, got.text
        assert got.json()["plan"] == "pro"

        # B's decisions follow within the cache bound; poll, never sleep past it blindly
        while True:
            decision = check(b_service, "initech", "/api/v1/items/1")
            elapsed = time.monotonic() - written
            if decision["plan"] == "pro":
                break
            assert elapsed < TENANT_CACHE_BOUND + 1.0, f"B still on {decision['plan']}"
            time.sleep(0.05)
        assert elapsed <= TENANT_CACHE_BOUND + 0.5
        assert decision["limit"] == 200000


async def test_a_quota_acquired_through_both_replicas_never_exceeds_its_cap(pair: Pair) -> None:
    headers = {"Authorization": f"Bearer {SERVICE}"}
    quota = "/v1/tenants/umbrella/quotas/applications"
    async with (
        httpx.AsyncClient(base_url=pair.a.url, headers=headers, timeout=10.0) as a,
        httpx.AsyncClient(base_url=pair.b.url, headers=headers, timeout=10.0) as b,
    ):
        responses = await asyncio.gather(
            *(client.post(f"{quota}/acquire", json={}) for _ in range(CAP) for client in (a, b))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * CAP + [403] * CAP, [r.text for r in responses]
        assert sorted(r.json()["used"] for r in responses if r.status_code == 200) == list(
            range(1, CAP + 1)
        )
        assert all(r.json()["code"] == "quota_exceeded" for r in responses if r.status_code == 403)

        # a retry through the other replica, with the same idempotency key, counts once
        released = await a.post(f"{quota}/release", json={"amount": 1})
        assert released.status_code == 200, released.text
        assert released.json()["used"] == CAP - 1
        first = await a.post(f"{quota}/acquire", json={"idempotency_key": "create-app-42"})
        assert first.status_code == 200, first.text
        assert first.json()["used"] == CAP
        retry = await b.post(f"{quota}/acquire", json={"idempotency_key": "create-app-42"})
        assert retry.status_code == 200, retry.text
        assert retry.json()["used"] == CAP

    with admin(pair.b) as b_admin:
        usage = b_admin.get(f"{quota}/usage")
        assert usage.status_code == 200, usage.text
        assert usage.json()["used"] == CAP
