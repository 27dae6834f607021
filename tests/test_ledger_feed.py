"""The tenant feed and ``LedgerUnavailable`` where only a real database can show them.

``ledger_conformance.py`` holds what every ledger answers (the feed scenarios run on
memory, SQLite and PostgreSQL); here is what needs a database's own machinery:

* a version-1 database (made by migration step 1 alone) migrates, and what it held is in
  the first snapshot;
* on PostgreSQL, a writer holding the feed's head row makes every later writer wait, so a
  poller never sees a position while an earlier one is uncommitted (the gap a sequence
  would leave), and a rolled-back position is handed out again;
* the feed row is written in the data's transaction: when it cannot be, neither is the data;
* PostgreSQL stopped (``pg_ctl stop``), a session terminated mid-call, a statement or
  lock timeout, a server that accepts and never answers, an SQLite file out of reach:
  ``LedgerUnavailable`` at once (or at the connect timeout), the original as the cause;
  once the database is back the next call works and the feed holds what was written
  before the outage. Other database failures stay plain ``StoreError``; a table holds
  the same rules to the errors a healthy machine cannot produce on demand.

Waits are for a server or a session to reach a state, never for time to pass.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from ledger_conformance import T, change
from servers import PostgresServer, ServersMissingError, require_postgres
from tenantguard.errors import LedgerUnavailable, StoreError
from tenantguard.ledger import Ledger, OverrideRecord, SqlLedger, TenantChanges, open_ledger
from tenantguard.ledger._connect import store_error
from tenantguard.ledger._schema import (
    FEED,
    FEED_HEAD,
    MIGRATIONS,
    OVERRIDES,
    SCHEMA_VERSION,
    TENANTS,
    _migrate,
)

STATE_TIMEOUT = 30.0
"""Seconds to wait for a session to reach a state before the test fails."""


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


@contextmanager
def _raw(url: str) -> Iterator[sa.Engine]:
    engine = _engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@asynccontextmanager
async def _opened(url: str) -> AsyncIterator[Ledger]:
    ledger = open_ledger(url)
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# --- migration --------------------------------------------------------------------------


async def test_a_version_1_database_migrates(durable_url: str) -> None:
    """A database made by step 1 alone gains the feed; its tenants and overrides are in
    the first snapshot (the feed starts at 0, after them)."""
    kept = OverrideRecord("acme", "apps", 500, None, "contract", None, "ops", T)
    with _raw(durable_url) as engine:
        assert _migrate(engine, 1) == 1
        with engine.begin() as conn:
            conn.execute(
                sa.insert(TENANTS).values(
                    tenant="acme", plan="pro", metadata={}, created_at=T, updated_at=T
                )
            )
            conn.execute(sa.insert(OVERRIDES).values(**_fields(kept)))
        assert not sa.inspect(engine).has_table(FEED.name)

    async with _opened(durable_url) as ledger:
        snapshot = await ledger.tenant_snapshot()
        assert (snapshot.cursor, snapshot.plans, snapshot.overrides) == (
            0,
            {"acme": "pro"},
            {"acme": [kept]},
        )
        assert await ledger.tenant_changes(0) == TenantChanges(0, {}, {}, complete=True)
        await ledger.upsert_tenant("globex", "free", None, T + 1)
        assert await ledger.tenant_changes(0) == TenantChanges(
            1, {"globex": "free"}, {"globex": []}, complete=True
        )
    with _raw(durable_url) as engine, engine.connect() as conn:
        versions = conn.scalars(sa.select(SCHEMA_VERSION.c.version).order_by("version"))
        assert list(versions) == list(range(1, len(MIGRATIONS) + 1))
        assert len(MIGRATIONS) == 2


def _fields(record: OverrideRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in OverrideRecord.__slots__}


# --- one transaction --------------------------------------------------------------------


async def test_no_feed_row_no_write(durable_url: str) -> None:
    """The feed row is part of the write: when it cannot be added, nothing is written
    (and that is a database fault, not an outage)."""
    async with _opened(durable_url) as ledger:
        await ledger.upsert_tenant("acme", "free", None, T)
        with _raw(durable_url) as engine, engine.begin() as conn:
            FEED.drop(conn)
        for write in (
            lambda: ledger.upsert_tenant("acme", "pro", None, T + 1),
            lambda: ledger.upsert_tenant("globex", "pro", None, T + 1),
            lambda: ledger.delete_tenant("acme"),
            lambda: ledger.put_override(OverrideRecord("acme", "a", 1, None, "", None, "", T)),
        ):
            with pytest.raises(StoreError, match="tenant_feed") as caught:
                await write()
            assert not isinstance(caught.value, LedgerUnavailable)
        assert [(r.tenant, r.plan) for r in await ledger.list_tenants()] == [("acme", "free")]
        assert await ledger.overrides("acme") == []


# --- gap-free on PostgreSQL -------------------------------------------------------------


async def _wait_for_lock_waiter(url: str, *, besides: int) -> int:
    """The pid of a session of ``url``'s database waiting on a lock, other than
    ``besides``; waits until there is one."""
    query = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() AND pid <> %s"
    )
    deadline = time.monotonic() + STATE_TIMEOUT
    with psycopg.connect(url, autocommit=True) as watcher:
        while True:
            row = watcher.execute(query, (besides,)).fetchone()
            if row is not None:
                return int(row[0])
            assert time.monotonic() < deadline, "no session started waiting on a lock"
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_postgres_writers_take_positions_in_commit_order(
    postgres_url: str, outcome: str
) -> None:
    """A writer that drew a position and has not committed holds back every later
    writer: a poller meanwhile sees neither (a sequence would let the later one commit
    first and the poller skip the earlier). Rolled back, its position is drawn again."""
    async with _opened(postgres_url) as ledger:
        await ledger.upsert_tenant("acme", "free", None, T)
        with _raw(postgres_url) as engine, engine.connect() as held:
            transaction = held.begin()
            draw = sa.update(FEED_HEAD).values(seq=FEED_HEAD.c.seq + 1)
            seq = held.execute(draw.returning(FEED_HEAD.c.seq)).scalar_one()
            held.execute(sa.insert(FEED).values(seq=seq, tenant="held", at=T))
            holder = held.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            assert seq == 2

            later = asyncio.ensure_future(ledger.upsert_tenant("globex", "pro", None, T))
            await _wait_for_lock_waiter(postgres_url, besides=holder)
            assert not later.done()
            assert await ledger.tenant_changes(1) == TenantChanges(1, {}, {}, complete=True)
            assert await ledger.get_tenant("globex") is None  # its data waits with it

            if outcome == "commit":
                transaction.commit()
            else:
                transaction.rollback()
            await later
        changes = await ledger.tenant_changes(1)
        if outcome == "commit":
            assert changes == TenantChanges(
                3, {"globex": "pro", "held": None}, {"globex": [], "held": []}, True
            )
        else:
            assert changes == TenantChanges(2, {"globex": "pro"}, {"globex": []}, True)


# --- LedgerUnavailable ------------------------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, to stop and start."""
    try:
        require_postgres()
    except ServersMissingError as error:
        pytest.fail(str(error), pytrace=False)
    with PostgresServer() as server:
        yield server


Call = Callable[[], Awaitable[object]]


async def _unavailable_at_once(call: Call) -> LedgerUnavailable:
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="cannot be reached") as caught:
        await call()
    assert time.monotonic() - started < 5.0
    assert isinstance(caught.value.__cause__, sa.exc.DBAPIError)
    return caught.value


async def test_postgres_stopped_then_started(own_postgres: PostgresServer) -> None:
    """Every call fails fast while the server is down; once it is back (the pool's
    connections all dead), the next calls work and the feed has what was written
    before the outage."""
    url = own_postgres.url
    async with _opened(url) as ledger:
        await ledger.upsert_tenant("acme", "free", None, T)
        snapshot = await ledger.tenant_snapshot()
        await ledger.upsert_tenant("globex", "pro", None, T + 1)  # not yet polled
        # several pooled connections, all of which the restart will kill
        await asyncio.gather(*(ledger.get_tenant("acme") for _ in range(4)))

        own_postgres.stop()
        for call in (
            lambda: ledger.tenant_changes(snapshot.cursor),
            ledger.tenant_snapshot,
            lambda: ledger.upsert_tenant("initech", "free", None, T + 2),
            lambda: ledger.change_usage("acme", [change("apps")], idempotency_key="k", now=T),
        ):
            await _unavailable_at_once(call)
        assert await ledger.ping() is False

        own_postgres.start()
        assert own_postgres.url == url
        assert await ledger.ping() is True
        assert await ledger.tenant_changes(snapshot.cursor) == TenantChanges(
            2, {"globex": "pro"}, {"globex": []}, complete=True
        )
        await ledger.upsert_tenant("initech", "free", None, T + 3)
        assert (await ledger.tenant_changes(2)).plans == {"initech": "free"}


@contextmanager
def _tenants_locked(url: str) -> Iterator[int]:
    """Hold an exclusive lock on the tenants table; yields the holder's pid."""
    with psycopg.connect(url) as holder:
        holder.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        pid = holder.info.backend_pid
        try:
            yield pid
        finally:
            holder.rollback()


async def test_postgres_session_terminated_mid_call(postgres_url: str) -> None:
    """The server ends the session while a write waits: unavailable, nothing written,
    and the next call gets a working connection."""
    async with _opened(postgres_url) as ledger:
        with _tenants_locked(postgres_url) as holder:
            write = asyncio.ensure_future(ledger.upsert_tenant("acme", "free", None, T))
            waiting = await _wait_for_lock_waiter(postgres_url, besides=holder)
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (waiting,))
            error = await _unavailable_at_once(lambda: write)
            assert isinstance(error.__cause__, sa.exc.OperationalError)
            assert isinstance(error.__cause__.orig, psycopg.errors.AdminShutdown)
        assert await ledger.tenant_changes(0) == TenantChanges(0, {}, {}, complete=True)
        await ledger.upsert_tenant("acme", "free", None, T)
        assert (await ledger.tenant_changes(0)).plans == {"acme": "free"}


@pytest.mark.parametrize(
    ("setting", "driver_error"),
    [
        ("statement_timeout", psycopg.errors.QueryCanceled),
        ("lock_timeout", psycopg.errors.LockNotAvailable),
    ],
)
async def test_postgres_timeouts_are_unavailable(
    postgres_url: str, setting: str, driver_error: type[psycopg.Error]
) -> None:
    """A statement the server gives up on is an outage of the ledger, not a fault."""
    url = f"{postgres_url}?options=-c%20{setting}%3D200"
    async with _opened(url) as ledger:
        with _tenants_locked(postgres_url):
            error = await _unavailable_at_once(lambda: ledger.upsert_tenant("a", "free", None, T))
            assert isinstance(error.__cause__, sa.exc.OperationalError)
            assert isinstance(error.__cause__.orig, driver_error)
        await ledger.upsert_tenant("a", "free", None, T)
        assert (await ledger.tenant_changes(0)).plans == {"a": "free"}


@pytest.mark.parametrize(("query", "seconds"), [("", 2.0), ("?connect_timeout=3", 3.0)])
def test_postgres_that_never_answers_times_out(query: str, seconds: float) -> None:
    """A server that accepts the connection and never answers fails the open after the
    connect timeout: 2 s unless the URL says otherwise."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable) as caught:
            SqlLedger(f"postgresql://postgres@127.0.0.1:{port}/tenantguard{query}")
        elapsed = time.monotonic() - started
    assert seconds - 0.5 <= elapsed < seconds + 3.0
    cause = caught.value.__cause__
    assert isinstance(cause, sa.exc.OperationalError)
    assert isinstance(cause.orig, psycopg.errors.ConnectionTimeout)


def test_postgres_refused_is_unavailable() -> None:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(LedgerUnavailable):
            open_ledger(f"postgresql://postgres@127.0.0.1:{port}/tenantguard")


async def test_sqlite_file_out_of_reach(tmp_path: Path) -> None:
    """The database's directory gone: unavailable; back: the next call works."""
    home = tmp_path / "ledger"
    home.mkdir()
    ledger = SqlLedger(f"sqlite:///{home / 'l.db'}")
    try:
        await ledger.upsert_tenant("acme", "free", None, T)
        ledger.engine.dispose()  # no open file left to keep using
        home.rename(tmp_path / "moved")
        error = await _unavailable_at_once(ledger.tenant_snapshot)
        assert isinstance(error.__cause__, sa.exc.OperationalError)
        orig = error.__cause__.orig
        assert isinstance(orig, sqlite3.OperationalError)
        assert orig.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN
        (tmp_path / "moved").rename(home)
        assert (await ledger.tenant_changes(0)).plans == {"acme": "free"}
    finally:
        await ledger.close()
    with pytest.raises(LedgerUnavailable):
        SqlLedger(f"sqlite:///{tmp_path / 'nowhere' / 'l.db'}")


async def test_other_failures_stay_store_errors(durable_url: str) -> None:
    """What a retry would meet again (here, a missing table) is a plain StoreError."""
    async with _opened(durable_url) as ledger:
        with _raw(durable_url) as engine, engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE usage"))
        with pytest.raises(StoreError, match="usage") as caught:
            await ledger.change_usage("acme", [change("apps")], idempotency_key=None, now=T)
        assert not isinstance(caught.value, LedgerUnavailable)
        assert isinstance(caught.value.__cause__, sa.exc.DBAPIError)


def _sqlite_error(code: int) -> sqlite3.Error:
    error = sqlite3.OperationalError(f"sqlite result code {code}")
    error.sqlite_errorcode = code  # what the sqlite3 module sets on errors it raises
    return error


@pytest.mark.parametrize(
    ("error", "reachable"),
    [
        # what the tests above cannot provoke on a healthy machine, by the same rules
        (sa.exc.OperationalError("", None, psycopg.errors.lookup("53100")("disk full")), False),
        (sa.exc.OperationalError("", None, psycopg.errors.lookup("58030")("I/O")), False),
        (sa.exc.OperationalError("", None, psycopg.errors.lookup("57P03")("starting")), False),
        (sa.exc.OperationalError("", None, psycopg.errors.lookup("08006")("failure")), False),
        (sa.exc.InterfaceError("", None, psycopg.InterfaceError("connection closed")), False),
        (sa.exc.TimeoutError("QueuePool limit reached"), False),
        (sa.exc.OperationalError("", None, _sqlite_error(sqlite3.SQLITE_IOERR_WRITE)), False),
        (sa.exc.OperationalError("", None, _sqlite_error(sqlite3.SQLITE_FULL)), False),
        (sa.exc.OperationalError("", None, _sqlite_error(sqlite3.SQLITE_BUSY)), False),
        # faults a retry would meet again
        (sa.exc.OperationalError("", None, psycopg.errors.lookup("40001")("conflict")), True),
        (sa.exc.OperationalError("", None, psycopg.errors.lookup("40P01")("deadlock")), True),
        (sa.exc.IntegrityError("", None, psycopg.errors.lookup("23505")("duplicate")), True),
        (sa.exc.OperationalError("", None, _sqlite_error(sqlite3.SQLITE_CORRUPT)), True),
        (sa.exc.OperationalError("", None, _sqlite_error(sqlite3.SQLITE_ERROR)), True),
        (sa.exc.ArgumentError("bad statement"), True),
    ],
)
def test_which_errors_mean_unreachable(error: sa.exc.SQLAlchemyError, reachable: bool) -> None:
    assert isinstance(store_error(error), LedgerUnavailable) is not reachable
