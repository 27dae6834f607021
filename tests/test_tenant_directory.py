"""The tenant directory: checks read tenants from memory, replicas follow the ledger's
change feed, and a ledger outage leaves checks answering on the last known state.

Replicas are two guards on one real SQLite file or one real PostgreSQL, each with its own
injected clock; a poll is an explicit ``refresh()`` step, so nothing here waits on time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from servers import PostgresServer
from tenantguard import Guard, LedgerUnavailable, parse_policy
from tenantguard.ledger import MemoryLedger, SqlLedger

POLICY = parse_policy(
    """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
default_plan: free
rate_limits:
  - name: reports
    match: {paths: ["/reports/{id}"]}
    window: 1m
    limits: {free: 5, pro: 50}
quotas:
  - name: apps
    limits: {free: 3, pro: 30}
""",
    source="policy.yaml",
)
START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def replicas(ledger_url: str) -> AsyncIterator[tuple[Guard, Guard, Clock]]:
    clock = Clock()
    a = Guard(POLICY, ledger=ledger_url, clock=clock)
    b = Guard(POLICY, ledger=ledger_url, clock=clock)
    await a.start()
    await b.start()
    try:
        yield a, b, clock
    finally:
        await a.close()
        await b.close()


async def limit_of(guard: Guard, tenant: str) -> int | None:
    return (await guard.check(tenant, "GET", "/reports/1")).limit


async def test_a_change_on_one_replica_reaches_the_other_at_its_next_poll(
    replicas: tuple[Guard, Guard, Clock],
) -> None:
    a, b, _ = replicas
    await a.tenants.upsert("acme", plan="pro")
    assert await limit_of(a, "acme") == 50  # the writer applies its own change at once
    assert await limit_of(b, "acme") == 5  # the other has not polled yet
    assert await b.refresh()
    assert await limit_of(b, "acme") == 50

    await a.overrides.set("acme", "reports", value=70, reason="launch")
    await a.tenants.upsert("globex", plan="pro")
    assert await b.refresh()
    assert (await limit_of(b, "acme"), await limit_of(b, "globex")) == (70, 50)

    await a.overrides.remove("acme", "reports")
    await a.tenants.delete("globex")
    assert await b.refresh()
    assert (await limit_of(b, "acme"), await limit_of(b, "globex")) == (50, 5)
    assert b.tenant_status().tenants == 1


async def test_many_changes_are_read_in_pages_until_none_is_left() -> None:
    ledger = MemoryLedger()  # the same feed semantics, without 2,500 durable commits
    a, b = Guard(POLICY, ledger=ledger), Guard(POLICY, ledger=ledger)
    await b.start()
    for index in range(2_500):  # more than two pages of the feed
        await a.tenants.upsert(f"t{index}", plan="pro")
    assert await limit_of(b, "t2499") == 5
    assert await b.refresh()
    assert b.tenant_status().tenants == 2_500
    assert await limit_of(b, "t2499") == 50


async def test_an_override_expires_by_the_clock_without_a_poll(
    replicas: tuple[Guard, Guard, Clock],
) -> None:
    a, b, clock = replicas
    await a.overrides.set("acme", "reports", value=2, reason="trial", expires_at=START + 60)
    assert await b.refresh()
    assert await limit_of(b, "acme") == 2
    clock.now = START + 60
    assert await limit_of(b, "acme") == 5  # no I/O: the directory knows the expiry


async def test_a_tenant_on_a_plan_the_policy_lacks_is_on_the_default_plan(
    replicas: tuple[Guard, Guard, Clock],
) -> None:
    a, b, _ = replicas
    await a.ledger.upsert_tenant("old", "legacy-gold", None, START)
    assert await b.refresh()
    decision = await b.check("old", "GET", "/reports/1")
    assert (decision.plan, decision.limit) == ("free", 5)


async def test_checks_never_read_the_ledger_once_the_directory_is_loaded() -> None:
    class Refusing(MemoryLedger):
        """Answers the feed; any per-tenant read on the hot path would fail."""

        async def get_tenant(self, tenant: str) -> Any:
            raise AssertionError("a check read the ledger")

        async def overrides(self, tenant: str) -> Any:
            raise AssertionError("a check read the ledger")

    ledger = Refusing()
    await ledger.upsert_tenant("acme", "pro", None, START)
    guard = Guard(POLICY, ledger=ledger, clock=Clock())
    for index in range(1_000):
        await guard.check(f"tenant-{index}", "GET", f"/reports/{index}")
    assert await limit_of(guard, "acme") == 50
    await guard.close()


async def test_a_purged_feed_position_reads_every_tenant_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    clock = Clock()
    a, b = Guard(POLICY, ledger=url, clock=clock), Guard(POLICY, ledger=url, clock=clock)
    try:
        await b.start()
        await a.tenants.upsert("acme", plan="pro")
        await a.ledger.purge(events_before=START + 1, keys_before=START + 1)  # the feed too
        assert await b.refresh()
        assert await limit_of(b, "acme") == 50
    finally:
        await a.close()
        await b.close()


# -- the ledger goes away ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own: the tests stop and start it."""
    with PostgresServer() as server:
        yield server


async def test_checks_go_on_while_the_ledger_is_down_and_recovery_reads_what_changed(
    own_postgres: PostgresServer,
) -> None:
    clock = Clock()
    url = own_postgres.url
    a = Guard(POLICY, ledger=url, clock=clock)
    b = Guard(POLICY, ledger=url, clock=clock)
    try:
        await a.tenants.upsert("acme", plan="pro")
        await b.start()
        assert b.tenant_status().ledger == "ok"

        own_postgres.stop()
        assert not await b.refresh()
        status = b.tenant_status()
        assert status.ledger == "down"
        for index in range(100):  # known and unknown tenants alike, for minutes: none refused
            clock.now += 2
            known = await b.check("acme", "GET", f"/reports/{index}")
            unknown = await b.check(f"new-{index}", "GET", f"/reports/{index}")
            assert (known.status, known.limit, known.degraded) == (200, 50, False)
            assert (unknown.status, unknown.limit) == (200, 5)
        status = b.tenant_status()
        assert status.stale_checks == 200
        assert status.stale_seconds == pytest.approx(200)
        with pytest.raises(LedgerUnavailable) as raised:
            await b.quotas.acquire("acme", "apps")
        assert raised.value.retry_after >= 1

        own_postgres.start()
        await a.tenants.upsert("acme", plan="free")  # a change made before b polls again
        await a.tenants.upsert("initech", plan="pro")
        assert await b.refresh()
        assert b.tenant_status().ledger == "ok"
        assert (await limit_of(b, "acme"), await limit_of(b, "initech")) == (5, 50)
        assert (await b.quotas.acquire("acme", "apps")).used == 1
    finally:
        if not own_postgres.running:
            own_postgres.start()
        await a.close()
        await b.close()


async def test_a_replica_started_while_the_ledger_is_down_serves_the_default_plan(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    clock = Clock()
    seeded = SqlLedger(own_postgres.url)
    await seeded.upsert_tenant("acme", "pro", None, START)
    await seeded.close()
    guard = Guard(POLICY, ledger=own_postgres.url, clock=clock)
    own_postgres.stop()
    try:
        await guard.start()
        assert guard.tenant_status().ledger == "loading"
        assert (await guard.check("acme", "GET", "/reports/1")).limit == 5
        own_postgres.start()
        assert await guard.refresh()
        assert guard.tenant_status().ledger == "ok"
        assert await limit_of(guard, "acme") == 50
    finally:
        if not own_postgres.running:
            own_postgres.start()
        await guard.close()


async def test_a_ledger_that_hangs_is_unavailable_after_the_call_timeout(tmp_path: Path) -> None:
    """A server that stops answering with its connections open (here: a write lock
    held elsewhere, with a busy timeout far longer) is given up on, not waited for."""
    path = tmp_path / "ledger.db"
    ledger = SqlLedger(f"sqlite:///{path}", busy_timeout=60, call_timeout=0.3)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerUnavailable, match=r"did not answer within 0\.3 s"):
            await ledger.upsert_tenant("acme", "pro", None, START)
        holder.execute("ROLLBACK")
        await ledger.upsert_tenant("acme", "pro", None, START)  # answers again
        assert (await ledger.tenant_snapshot()).plans == {"acme": "pro"}
    finally:
        holder.close()
        await ledger.close()
