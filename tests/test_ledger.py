"""Every ledger scenario against every ledger backend, and what only a database has:
migrations, the SQLite durability settings, several processes at once, kill -9.

``BACKENDS`` is the one table to extend: a factory takes its server from a fixture
(``request.getfixturevalue``) and yields an open, empty ledger. Test ids read
``<backend>-<scenario>``, e.g. ``sqlite-usage-all-or-nothing``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tenantguard.ledger
from ledger_conformance import SCENARIOS, Scenario, T, change
from tenantguard.errors import StoreError
from tenantguard.ledger import (
    Ledger,
    MemoryLedger,
    SchemaVersionError,
    SqlLedger,
    UsageChange,
    open_ledger,
)
from tenantguard.ledger._schema import MIGRATIONS, SCHEMA_VERSION


def _sqlite_file(request: pytest.FixtureRequest) -> str:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def _postgresql(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("postgres_url")
    return url


SQL_URLS: dict[str, Callable[[pytest.FixtureRequest], str]] = {
    "sqlite": _sqlite_file,
    "sqlite-memory": lambda _: "sqlite://",
    "postgresql": _postgresql,
}
"""Database backends: a URL for an empty database, from the test's fixtures."""


def _backend(url: Callable[[pytest.FixtureRequest], str]) -> Backend:
    @asynccontextmanager
    async def opened(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
        ledger = open_ledger(url(request))
        try:
            yield ledger
        finally:
            await ledger.close()

    return opened


Backend = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[Ledger]]

BACKENDS: dict[str, Backend] = {
    "memory": _backend(lambda _: "memory"),
    **{name: _backend(url) for name, url in SQL_URLS.items()},
}

DURABLE = ["sqlite", "postgresql"]
"""Backends that keep their data across opens (and processes)."""


@pytest.fixture
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    """A fresh, empty ledger of the backend named by the test's ``ledger`` parameter."""
    backend: str = request.param
    async with BACKENDS[backend](request) as opened:
        yield opened


@pytest.fixture
def durable_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database of the backend named by the ``durable_url`` parameter."""
    return SQL_URLS[request.param](request)


def test_scenario_names_are_unique() -> None:
    names = [name for name, _ in SCENARIOS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("ledger", "scenario"),
    [
        pytest.param(backend, scenario, id=f"{backend}-{name}")
        for backend in BACKENDS
        for name, scenario in SCENARIOS
    ],
    indirect=["ledger"],
)
async def test_conformance(ledger: Ledger, scenario: Scenario) -> None:
    await scenario(ledger)


# --- opening ----------------------------------------------------------------------------


def test_all_names_exist() -> None:
    exported = tenantguard.ledger.__all__
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(tenantguard.ledger, name), name


async def test_open_ledger_picks_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_ledger("memory"), MemoryLedger)
    for url in ("sqlite://", f"sqlite:///{tmp_path / 'a.db'}"):
        ledger = open_ledger(url)
        assert isinstance(ledger, SqlLedger)
        await ledger.close()


@pytest.mark.parametrize(
    "url", ["redis://localhost", "mysql://db/x", "ledger.db", "", "postgresql+asyncpg://h/db"]
)
def test_open_ledger_names_the_accepted_schemes(url: str) -> None:
    with pytest.raises(ValueError, match=r"not supported; expected .*sqlite:///.*postgresql://"):
        open_ledger(url)


def test_unreachable_database_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="ledger database") as caught:
        open_ledger("postgresql://nobody@127.0.0.1:1/nothing?connect_timeout=2")
    assert isinstance(caught.value.__cause__, sa.exc.OperationalError)


async def test_failures_keep_the_original_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = open_ledger(url)
    with closing(sqlite3.connect(tmp_path / "l.db")) as raw:
        raw.execute("DROP TABLE usage")
    with pytest.raises(StoreError, match="usage") as caught:
        await ledger.change_usage("acme", [change("apps")], idempotency_key=None, now=T)
    assert isinstance(caught.value.__cause__, sa.exc.OperationalError)
    await ledger.close()


# --- migrations -------------------------------------------------------------------------


def _versions(url: str) -> list[int]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            query = sa.select(SCHEMA_VERSION.c.version).order_by(SCHEMA_VERSION.c.version)
            return list(conn.scalars(query))
    finally:
        engine.dispose()


@pytest.mark.parametrize("durable_url", DURABLE, indirect=True)
async def test_migrations_recorded_once(durable_url: str) -> None:
    first = open_ledger(durable_url)
    await first.upsert_tenant("acme", "free", None, T)
    await first.close()
    assert _versions(durable_url) == list(range(1, len(MIGRATIONS) + 1))
    again = open_ledger(durable_url)
    assert await again.get_tenant("acme") is not None
    await again.close()
    assert _versions(durable_url) == list(range(1, len(MIGRATIONS) + 1))


@pytest.mark.parametrize("durable_url", DURABLE, indirect=True)
def test_replicas_opening_a_fresh_database_at_once(durable_url: str) -> None:
    """Eight openers race to migrate one empty database: all succeed, each step once."""
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            asyncio.run(SqlLedger(durable_url).close())
        except BaseException as error:  # collected for the assertion below
            failures.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert _versions(durable_url) == list(range(1, len(MIGRATIONS) + 1))


@pytest.mark.parametrize("durable_url", DURABLE, indirect=True)
async def test_newer_schema_is_refused(durable_url: str) -> None:
    await open_ledger(durable_url).close()
    ahead = len(MIGRATIONS) + 1
    engine = sa.create_engine(durable_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.insert(SCHEMA_VERSION).values(version=ahead, description="future"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=f"version {ahead}.*up to {len(MIGRATIONS)}"):
        open_ledger(durable_url)


# --- SQLite durability ------------------------------------------------------------------


async def test_sqlite_is_wal_fsynced_and_waits_for_locks(tmp_path: Path) -> None:
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'w.db'}", busy_timeout=7.5)
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7500
    await ledger.close()
    with closing(sqlite3.connect(tmp_path / "w.db")) as raw:  # WAL is a property of the file
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_sqlite_writes_begin_immediate(tmp_path: Path) -> None:
    """A write transaction holds the write lock from its first statement, so a second
    writer waits at BEGIN instead of failing when it upgrades a read."""
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'i.db'}")
    statements: list[str] = []
    sa.event.listen(
        ledger.engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    with ledger.engine.begin() as conn:
        conn.execute(sa.select(1))
        raw = sqlite3.connect(tmp_path / "i.db", timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            raw.execute("BEGIN IMMEDIATE")
        raw.close()
    assert statements[0] == "BEGIN IMMEDIATE"
    asyncio.run(ledger.close())


def test_sqlite_switching_a_fresh_file_to_wal_waits_for_the_write_lock(tmp_path: Path) -> None:
    """Opening a fresh file switches it to WAL, upgrading a read lock to the write lock:
    SQLite refuses that at once while another connection writes, whatever busy_timeout
    says (replicas opening one fresh database at once meet this). The opener waits
    busy_timeout for it all the same, and gets it when the writer finishes."""
    path = tmp_path / "fresh.db"
    url = f"sqlite:///{path}"
    with closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # the write lock of a file still in rollback mode
        started = time.monotonic()
        with pytest.raises(StoreError, match="database is locked"):
            SqlLedger(url, busy_timeout=0.25)
        assert time.monotonic() - started >= 0.25
        finish = threading.Timer(0.25, writer.execute, ["COMMIT"])
        finish.start()
        ledger = SqlLedger(url, busy_timeout=30)
        finish.join()
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    asyncio.run(ledger.close())
    assert _versions(url) == list(range(1, len(MIGRATIONS) + 1))


# --- several processes ------------------------------------------------------------------

PROCESSES = 4
ATTEMPTS = 40  # per process
LIMIT = 50


def _worker(url: str, barrier: threading.Barrier) -> int:
    async def run() -> int:
        ledger = open_ledger(url)
        try:
            barrier.wait()
            admitted = 0
            for _ in range(ATTEMPTS):
                result = await ledger.change_usage(
                    "acme", [UsageChange("apps", "", "", 1, LIMIT)], idempotency_key=None, now=T
                )
                admitted += result.ok
            return admitted
        finally:
            await ledger.close()

    return asyncio.run(run())


@pytest.mark.parametrize("durable_url", DURABLE, indirect=True)
async def test_processes_never_cross_a_cap(durable_url: str) -> None:
    await open_ledger(durable_url).close()  # migrate once, up front
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        barrier = manager.Barrier(PROCESSES)
        admitted = pool.starmap(_worker, [(durable_url, barrier)] * PROCESSES)
    assert sum(admitted) == LIMIT
    ledger = open_ledger(durable_url)
    assert [row.used for row in await ledger.usage("acme")] == [LIMIT]
    await ledger.close()


KILLED_WRITER = """
import asyncio, sys
from tenantguard.ledger import UsageChange, open_ledger

async def main() -> None:
    ledger = open_ledger(sys.argv[1])
    n = 0
    while True:
        n += 1
        change = UsageChange("apps", "", "", 1, None)
        await ledger.change_usage("acme", [change], idempotency_key=f"k{n}", now=float(n))
        print(n, flush=True)

asyncio.run(main())
"""


async def test_sqlite_acknowledged_changes_survive_kill_9(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    await open_ledger(url).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, url], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    acknowledged = 0
    try:
        while acknowledged < 100:
            acknowledged = int(writer.stdout.readline())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    ledger = open_ledger(url)
    [row] = await ledger.usage("acme")
    assert row.used >= acknowledged  # and a few more may have committed before the kill
    for n in (1, acknowledged, row.used):  # each counted once, under its own key
        replay = await ledger.change_usage("acme", [change("apps")], idempotency_key=f"k{n}", now=T)
        assert replay.replayed
        assert replay.used == (n,)
    await ledger.close()


async def test_close_waits_for_calls_in_flight(tmp_path: Path) -> None:
    """A call already running when ``close`` is called (its caller may even have given
    up) finishes, and its connection is closed with the rest, not left to the GC."""
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'c.db'}")
    started, release = threading.Event(), threading.Event()
    used: list[Any] = []

    def work(conn: sa.Connection) -> int:
        used.append(conn.connection.dbapi_connection)
        started.set()
        release.wait(timeout=30)
        return int(conn.execute(sa.select(1)).scalar_one())

    def closing_started() -> bool:
        with ledger._calls:
            return ledger._calls.wait_for(lambda: ledger._closed, timeout=30)

    call = asyncio.create_task(ledger._call(work))
    assert await asyncio.to_thread(started.wait, 30)
    closing = asyncio.create_task(ledger.close())
    assert await asyncio.to_thread(closing_started)
    assert not closing.done()
    release.set()
    assert await call == 1
    await closing
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        used[0].execute("SELECT 1")
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.get_tenant("acme")
