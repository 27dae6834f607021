"""How the SQL ledger reaches its database, and what it calls a failure to reach it.

SQLite runs in WAL mode with ``synchronous=FULL`` (every acknowledged change is on disk
before the call returns) and starts every write transaction with ``BEGIN IMMEDIATE``: a
writer takes the write lock up front and waits ``busy_timeout`` for it, rather than
reading first and failing (``SQLITE_BUSY``) when it tries to upgrade. Switching a fresh
file to WAL is such an upgrade that cannot begin IMMEDIATE, so ``_enter_wal`` does the
waiting for it (replicas opening one new database at once all try to switch it).

PostgreSQL connections get a connect timeout and TCP keepalives unless the URL sets
them, and the pool checks a connection before lending it (``pool_pre_ping``): a call
fails within seconds while the server is away instead of hanging, and the first call
after it is back gets a fresh connection rather than one the restart killed.

``LedgerUnavailable`` (a ``StoreError``) means the database cannot be reached or cannot
answer in time: refused, reset or timed-out connections, a server shutting down or
terminating the session, a cancelled statement, disk and I/O failures, a lock wait that
ran out. The caller can only wait and retry, and a front door answers 503. Every other
database error is a plain ``StoreError``: a retry would meet it again. The two are told
apart by SQLAlchemy's error classes and the drivers' result codes (``unavailable``),
never by message text, which changes with versions and locales.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from tenantguard.errors import LedgerUnavailable, StoreError
from tenantguard.ledger._schema import dump_json, load_json

__all__ = ["READ_ONLY", "open_engine", "store_error", "unavailable"]

READ_ONLY = "tenantguard_read_only"
"""Execution option: this transaction only reads (SQLite: a plain, deferred BEGIN)."""


def store_error(error: SQLAlchemyError) -> StoreError:
    """The error callers see: the driver's message, the original chained as the cause;
    ``LedgerUnavailable`` when the database could not be reached (``unavailable``)."""
    cause = error.orig if isinstance(error, DBAPIError) else error
    if unavailable(error):
        return LedgerUnavailable(f"the ledger database cannot be reached: {cause}")
    return StoreError(f"the ledger database failed: {cause}")


_SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,  # busy_timeout ran out waiting for another writer
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,  # the file or its directory is gone or out of reach
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,  # e.g. a file system remounted read-only after errors
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOLFS,
    }
)
"""Primary result codes that say the file cannot be reached or written now, as opposed
to what a retry would meet again (a missing table, a constraint, a corrupt file)."""

_POSTGRES_UNAVAILABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: shutdown, session terminated, statement timeout
        "58",  # system error: I/O
    }
)
_POSTGRES_UNAVAILABLE_CODES = frozenset(
    {
        "55P03",  # lock_not_available: lock_timeout ran out
        "25P03",  # idle_in_transaction_session_timeout
    }
)
"""SQLSTATEs that say the server cannot serve this session now. By code, not by
psycopg's classes: it has one class per code (``AdminShutdown``, ``QueryCanceled`` …),
not one per SQLSTATE class, so a class test would miss codes added later."""


def unavailable(error: SQLAlchemyError) -> bool:
    """Whether ``error`` says the database cannot be reached, rather than that it
    refused what was asked of it."""
    if isinstance(error, sa.exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated or isinstance(error, sa.exc.InterfaceError):
        return True  # SQLAlchemy saw the connection drop; or the driver's was closed
    cause = error.orig
    if isinstance(cause, sqlite3.Error):
        code = getattr(cause, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    if isinstance(cause, psycopg.InterfaceError):
        return True  # the driver's connection is closed
    if isinstance(cause, psycopg.OperationalError):
        state = cause.sqlstate
        if state is None:  # the client gave up (refused, reset, timed out): no server said
            return True
        return state[:2] in _POSTGRES_UNAVAILABLE_CLASSES or state in _POSTGRES_UNAVAILABLE_CODES
    return False


# --- engines --------------------------------------------------------------------------


def open_engine(url: str, busy_timeout: float) -> tuple[sa.Engine, AbstractContextManager[Any]]:
    """The engine for ``url``, and the lock its calls must hold (only in-memory SQLite,
    whose one shared connection cannot serve two threads at once)."""
    parsed = sa.make_url(url)
    json = {"json_serializer": dump_json, "json_deserializer": load_json}
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if parsed.database in (None, "", ":memory:"):
            engine = sa.create_engine(
                parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}, **json
            )
            _sqlite_transactions(engine, busy_timeout)
            return engine, threading.Lock()
        engine = sa.create_engine(parsed, **json)
        _sqlite_transactions(engine, busy_timeout)
        return engine, nullcontext()
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        driver = parsed.set(drivername="postgresql+psycopg")
        given = {
            name: value for name, value in _POSTGRES_CONNECT.items() if name not in parsed.query
        }
        engine = sa.create_engine(driver, pool_pre_ping=True, connect_args=given, **json)
        return engine, nullcontext()
    raise ValueError(
        f"ledger URL scheme {parsed.drivername!r} is not supported; expected sqlite:///PATH "
        "or postgresql://…"
    )


_POSTGRES_CONNECT: dict[str, int] = {
    "connect_timeout": 2,  # seconds to connect: a server away fails the call, not hangs it
    # a server that vanished mid-call (no reset ever comes) is given up on within ~15 s:
    # keepalive probes while waiting for an answer, and a bound on unacknowledged sends
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # milliseconds
}
"""libpq settings the ledger's PostgreSQL connections get unless the URL gives them."""


def _sqlite_transactions(engine: sa.Engine, busy_timeout: float) -> None:
    """Take transaction control from pysqlite (SQLAlchemy's documented recipe) so that
    writes begin IMMEDIATE, and set the durability pragmas on every new connection."""

    @sa.event.listens_for(engine, "connect")
    def connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite no longer emits BEGIN itself
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {round(busy_timeout * 1000)}")
            _enter_wal(cursor, busy_timeout)
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def begin(conn: sa.Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


_WAL_PAUSES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
"""Seconds between attempts to switch to WAL; the last one repeats until the timeout."""


def _enter_wal(cursor: sqlite3.Cursor, busy_timeout: float) -> None:
    """Switch the database to WAL, waiting up to ``busy_timeout`` for other connections.

    On a file not yet in WAL (a fresh one), ``PRAGMA journal_mode = WAL`` reads page 1
    under a shared lock, then upgrades to a write lock to mark the file WAL. SQLite never
    calls the busy handler for an upgrade from a lock already held (two upgraders waiting
    on each other would deadlock), so ``busy_timeout`` does not cover it: while another
    connection holds the write lock, as when several replicas open one fresh database at
    once and all switch it, the pragma fails at once with ``SQLITE_BUSY`` ("database is
    locked"). Nor can it begin IMMEDIATE: the journal mode cannot change inside a
    transaction. So the waiting is done here: the failed pragma has released its shared
    lock, and it is retried until it succeeds or ``busy_timeout`` has passed. On a file
    already in WAL the pragma writes nothing and cannot meet this.
    """
    deadline = time.monotonic() + busy_timeout
    for attempt in itertools.count():
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as error:
            left = deadline - time.monotonic()
            if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or left <= 0:
                raise
            time.sleep(min(_WAL_PAUSES[min(attempt, len(_WAL_PAUSES) - 1)], left))
        else:
            return
