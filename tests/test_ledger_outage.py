"""A PostgreSQL ledger outage under load, end to end, through real ``tenantguard serve``.

Two replicas (memory counters) share a PostgreSQL of this module's own, so stopping it
disturbs no other test. Sixteen clients send ``POST /v1/check`` to replica A for a known
tenant and for unknown ones, every path with an id of its own, while the test stops
PostgreSQL (``pg_ctl stop -m fast``), keeps the load going, starts it again and keeps
going. The load is bounded by count, never by time: each phase is given a number of
requests to send (``Load.extend``), and the test moves on when they are answered.

What it holds the service to (README, "Tenants, quotas …"; ``_api_readiness``):

- no check is ever refused for the outage: every answer is 200 with an allowed,
  non-degraded decision on the tenant's last known plan and override (unknown tenants:
  the default plan), before, during and after;
- ``/readyz`` stays 200 and tells the admin token ``checks.ledger == "down"`` and how
  stale the tenant state is; ``tenantguard_stale_checks_total`` counts the checks
  answered meanwhile;
- what needs the ledger itself answers 503 ``ledger_unavailable`` with ``Retry-After``,
  and counts nothing;
- once PostgreSQL is back, a change through A applies to A's next check, and reaches B
  (which lived through the outage too) within the documented bound of 2 s.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import PostgresServer
from test_e2e import ADMIN, PORT_ATTEMPTS, SERVICE, Replica

WORKERS = 16
BEFORE = 500  # checks answered before PostgreSQL is stopped
DOWN = 1_000  # checks sent once the replica says the ledger is down
AFTER = 500  # checks sent once the replica says the ledger answers again
TRANSIT = 800  # at most this many more while PostgreSQL stops or starts (then load waits)
LEDGER_STATE_TIMEOUT = 15.0  # one failed or successful poll (1 s apart) and a ping
READYZ_POLL = 0.05

TENANT_CACHE_BOUND = 2.0  # README: a change through another replica applies within 2 s
# The delay is observed as (first answer from B showing the change) - (A's answer to
# the write). That overstates the moment B applied the change by at most the time from
# sending B's last stale check to receiving its first fresh one: one POLL_GAP and two
# loopback round trips (a few ms each). 0.1 s covers those on a busy machine, and is a
# tenth of what a missed poll (one whole 1 s interval) would add, so it hides none.
ALLOWANCE = 0.1
POLL_GAP = 0.02
PROPAGATION_DEADLINE = 10.0

LIMITS = {"free": 100_000, "pro": 200_000, "scale": 300_000}
OVERRIDE = 250_000  # acme's value for ``reports``
POLICY = f"""\
version: 1
plans:
  - {{name: free, enforcement: hard}}
  - {{name: pro, enforcement: soft}}
  - {{name: scale, enforcement: soft}}
default_plan: free
rate_limits:
  - name: items
    match: {{paths: ["/api/v1/items/{{id}}"]}}
    algorithm: token-bucket
    window: 1d
    limits: {{free: {LIMITS["free"]}, pro: {LIMITS["pro"]}, scale: {LIMITS["scale"]}}}
  - name: reports
    match: {{paths: ["/api/v1/reports/{{id}}"]}}
    algorithm: token-bucket
    window: 1d
    limits: {{free: {LIMITS["free"]}, pro: {LIMITS["pro"]}, scale: {LIMITS["scale"]}}}
quotas:
  - name: applications
    limits: {{free: 5, pro: 50, scale: 500}}
"""
QUOTA = "/v1/tenants/acme/quotas/applications"


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own: the test stops and starts it."""
    with PostgresServer() as server:
        yield server


def start_replicas(replicas: list[Replica]) -> None:
    """Spawn them all at once (as a rollout does); another port if one was taken."""
    pending = list(replicas)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        for replica in pending:
            replica.spawn()
        failed = [replica for replica in pending if not replica.wait_ready()]
        for replica in failed:
            in_use = "address already in use" in replica.log().lower()
            replica.stop()
            if not in_use or attempt == PORT_ATTEMPTS:
                pytest.fail(f"replica {replica.name} exited at startup\n{replica.log()}")
        if not failed:
            return
        pending = failed


def client(replica: Replica, token: str | None) -> httpx.AsyncClient:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=replica.url, headers=headers, timeout=10.0)


# --- the load ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One ``/v1/check`` as sent (phase, tenant, rule) and as answered."""

    phase: str
    tenant: str
    rule: str
    status: int  # -1: no HTTP answer (or no JSON) at all
    decision: dict[str, Any] | None
    error: str


class Load:
    """``WORKERS`` clients sending checks while permits last.

    ``extend(n)`` lets ``n`` more be sent from now on (dropping any unused permits);
    ``phase`` is recorded with every check when it is sent. Request ``i`` is for
    ``acme`` (items, reports) or for a tenant nobody wrote, ``new-<i>``, every path with
    the id ``i``."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.phase = "before"
        self.sent = 0
        self.done = 0
        self.allowed = 0
        self.finished = False
        self.answers: list[Answer] = []
        self._changed = asyncio.Condition()

    async def extend(self, count: int) -> int:
        """Permit ``count`` more; the index of the first of them."""
        async with self._changed:
            first = self.sent
            self.allowed = first + count
            self._changed.notify_all()
        return first

    async def reached(self, done: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= done)

    async def settle(self) -> None:
        """Until every permitted check is answered."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= self.allowed)

    async def finish(self) -> None:
        async with self._changed:
            self.finished = True
            self._changed.notify_all()

    @property
    def in_flight(self) -> int:
        return self.sent - self.done

    async def worker(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self.finished or self.sent < self.allowed)
                if self.finished:
                    return
                index, phase = self.sent, self.phase
                self.sent += 1
            tenant = "acme" if index % 4 < 2 else f"new-{index}"
            rule = "items" if index % 2 == 0 else "reports"
            try:
                answer = await self._check(tenant, rule, index)
            except Exception as error:  # noted and asserted on; a dead worker would hang
                answer = (-1, None, repr(error))
            self.answers.append(Answer(phase, tenant, rule, *answer))
            async with self._changed:
                self.done += 1
                self._changed.notify_all()

    async def _check(
        self, tenant: str, rule: str, index: int
    ) -> tuple[int, dict[str, Any] | None, str]:
        body = {"tenant": tenant, "method": "GET", "path": f"/api/v1/{rule}/{index}"}
        response = await self.http.post("/v1/check", json=body)
        if response.status_code != 200:
            return response.status_code, None, response.text
        decision: dict[str, Any] = response.json()
        return 200, decision, ""


def expected(answer: Answer) -> tuple[str, int]:
    """The plan and limit every check of the load must carry: acme's state as seeded
    (pro, with its ``reports`` override), the default plan for everyone else."""
    if answer.tenant != "acme":
        return "free", LIMITS["free"]
    return "pro", OVERRIDE if answer.rule == "reports" else LIMITS["pro"]


def wrong(answer: Answer) -> bool:
    if answer.status != 200 or answer.decision is None:
        return True
    d = answer.decision
    got = (d["tenant"], d["rule"], d["plan"], d["limit"], d["allowed"], d["status"], d["degraded"])
    return got != (answer.tenant, answer.rule, *expected(answer), True, 200, False)


# --- probes --------------------------------------------------------------------------


async def ledger_state(admin: httpx.AsyncClient, want: str) -> dict[str, Any]:
    """Poll ``/readyz`` (admin) until both the ping and the tenant state say ``want``;
    every answer meanwhile must be 200."""
    deadline = time.monotonic() + LEDGER_STATE_TIMEOUT
    while True:
        response = await admin.get("/readyz")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["checks"]["ledger"] == want and body["tenant_state"]["ledger"] == want:
            return body
        assert time.monotonic() < deadline, f"ledger not {want!r} in time: {body}"
        await asyncio.sleep(READYZ_POLL)


async def stale_checks(http: httpx.AsyncClient) -> float:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "tenantguard_stale_checks_total":
                return sample.value
    pytest.fail(f"no tenantguard_stale_checks_total in /metrics:\n{response.text}")


async def check(http: httpx.AsyncClient, rule: str, index: int) -> dict[str, Any]:
    path = f"/api/v1/{rule}/{index}"
    response = await http.post("/v1/check", json={"tenant": "acme", "method": "GET", "path": path})
    assert response.status_code == 200, response.text
    decision: dict[str, Any] = response.json()
    return decision


async def propagation_delay(
    http: httpx.AsyncClient, rule: str, arrived: Callable[[dict[str, Any]], bool], since: float
) -> float:
    """Poll B's checks until ``arrived``; seconds from ``since`` to that answer."""
    index = 0
    while True:
        index += 1
        decision = await check(http, rule, 10_000_000 + index)
        delay = time.monotonic() - since
        if arrived(decision):
            return delay
        assert delay < PROPAGATION_DEADLINE, f"B still answers {decision} after {delay:.2f} s"
        await asyncio.sleep(POLL_GAP)


# --- the test ------------------------------------------------------------------------


async def test_checks_ride_through_a_ledger_outage_under_load_and_pick_up_changes_after(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    a, b = (Replica(n, tmp_path, policy, "memory", own_postgres.url) for n in ("a", "b"))
    try:
        start_replicas([a, b])
        async with (
            client(a, SERVICE) as a_service,
            client(a, ADMIN) as a_admin,
            client(a, None) as a_open,
            client(b, SERVICE) as b_service,
            client(b, ADMIN) as b_admin,
        ):
            await outage_under_load(own_postgres, a_service, a_admin, a_open, b_admin)
            await changes_after_recovery(a_service, a_admin, b_service, b_admin)
    finally:
        a.stop()
        b.stop()


async def outage_under_load(
    postgres: PostgresServer,
    service: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    anonymous: httpx.AsyncClient,
    b_admin: httpx.AsyncClient,
) -> None:
    put = await admin.put("/v1/tenants/acme", json={"plan": "pro"})
    assert put.status_code == 200, put.text
    put = await admin.put(
        "/v1/tenants/acme/overrides/reports", json={"value": OVERRIDE, "reason": "launch"}
    )
    assert put.status_code == 200, put.text
    acquired = await service.post(f"{QUOTA}/acquire", json={})
    assert (acquired.status_code, acquired.json()["used"]) == (200, 1), acquired.text
    await ledger_state(admin, "ok")
    assert (await anonymous.get("/readyz")).status_code == 200
    port = postgres.port

    load = Load(service)
    workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]
    try:
        await load.extend(BEFORE + TRANSIT)
        await load.reached(BEFORE)
        load.phase = "stopping"
        assert load.in_flight > 0  # PostgreSQL goes away under load, not between requests
        await asyncio.to_thread(postgres.stop)

        ready = await ledger_state(admin, "down")
        load.phase = "down"
        first = await load.extend(DOWN + TRANSIT)
        # while the load goes on: ready, and saying why the state may be stale
        stale = ready["tenant_state"]["stale_seconds"]
        assert isinstance(stale, int | float), ready
        assert not isinstance(stale, bool), ready
        assert stale >= 0, ready
        plain = await anonymous.get("/readyz")
        assert plain.status_code == 200, plain.text
        assert "checks" not in plain.json()  # the admin token's only
        # what needs the ledger itself is refused, retryable, and counts nothing
        refused = await service.post(f"{QUOTA}/acquire", json={})
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == "ledger_unavailable", refused.text
        assert int(refused.headers["Retry-After"]) >= 1, refused.headers
        write = await admin.put("/v1/tenants/acme", json={"plan": "scale"})
        assert (write.status_code, write.json()["code"]) == (503, "ledger_unavailable")
        await load.reached(first + DOWN)
        # the first DOWN checks sent while down are answered, each counted as stale
        assert await stale_checks(anonymous) >= DOWN
        assert (await ledger_state(admin, "down"))["tenant_state"]["stale_seconds"] >= stale

        load.phase = "restarting"
        assert load.in_flight > 0
        await asyncio.to_thread(postgres.start)
        assert postgres.port == port, "PostgreSQL came back on another port"
        await ledger_state(admin, "ok")
        load.phase = "after"
        await load.extend(AFTER)
        await load.settle()
    finally:
        await load.finish()
        await asyncio.gather(*workers)

    phases = Counter(answer.phase for answer in load.answers)
    assert phases["before"] >= BEFORE, phases
    assert phases["stopping"] >= 1, phases
    assert phases["down"] >= DOWN, phases
    assert phases["restarting"] >= 1, phases
    assert phases["after"] == AFTER, phases
    assert sum(phases.values()) <= BEFORE + DOWN + AFTER + 2 * TRANSIT, phases
    unknown = [answer.tenant for answer in load.answers if answer.tenant != "acme"]
    assert len(set(unknown)) == len(unknown) > 0  # every one a tenant of its own
    assert sum(a.tenant == "acme" and a.phase == "down" for a in load.answers) >= DOWN // 2
    bad = [answer for answer in load.answers if wrong(answer)]
    statuses = Counter((answer.phase, answer.status) for answer in bad)
    assert not bad, f"{len(bad)} wrong answers by (phase, status): {statuses}; first: {bad[:3]}"

    # back: the refused acquire counted nothing; B recovered as well
    acquired = await service.post(f"{QUOTA}/acquire", json={})
    assert (acquired.status_code, acquired.json()["used"]) == (200, 2), acquired.text
    await ledger_state(b_admin, "ok")


async def changes_after_recovery(
    a_service: httpx.AsyncClient,
    a_admin: httpx.AsyncClient,
    b_service: httpx.AsyncClient,
    b_admin: httpx.AsyncClient,
) -> None:
    # B holds acme's state from before the outage, and the refused write never applied
    before = await check(b_service, "items", 1)
    assert (before["plan"], before["limit"]) == ("pro", LIMITS["pro"]), before

    put = await a_admin.put("/v1/tenants/acme", json={"plan": "scale"})
    acknowledged = time.monotonic()
    assert put.status_code == 200, put.text
    now = await check(a_service, "items", 2)  # the writer applies its own change at once
    assert (now["plan"], now["limit"]) == ("scale", LIMITS["scale"]), now
    assert (await check(a_service, "reports", 3))["limit"] == OVERRIDE  # the override stays
    delay = await propagation_delay(
        b_service, "items", lambda d: d["limit"] == LIMITS["scale"], acknowledged
    )
    assert delay <= TENANT_CACHE_BOUND + ALLOWANCE, f"plan change reached B after {delay:.2f} s"

    removed = await a_admin.delete("/v1/tenants/acme/overrides/reports")
    acknowledged = time.monotonic()
    assert removed.status_code == 204, removed.text
    assert (await check(a_service, "reports", 4))["limit"] == LIMITS["scale"]
    delay = await propagation_delay(
        b_service, "reports", lambda d: d["limit"] == LIMITS["scale"], acknowledged
    )
    assert delay <= TENANT_CACHE_BOUND + ALLOWANCE, (
        f"override removal reached B after {delay:.2f} s"
    )
    detail = await b_admin.get("/v1/tenants/acme")
    assert detail.status_code == 200, detail.text
    assert (detail.json()["plan"], detail.json()["overrides"]) == ("scale", [])
