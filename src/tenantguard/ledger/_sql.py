"""The durable ledger on SQLAlchemy Core: SQLite embedded, PostgreSQL distributed.

One code path serves both; only the ``INSERT … ON CONFLICT DO NOTHING`` construct is
picked by dialect. Calls run on a worker thread (``asyncio.to_thread``) over a sync
engine, so the event loop never waits on disk or network. A cancelled call still
finishes its transaction on that thread, which is why callers retry with idempotency keys.

Counts change only by conditional updates (``used + n <= limit``) whose row count says
whether the condition held. The rows a change touches are updated in one global order
(quota, scope, period), so concurrent multi-counter changes on PostgreSQL queue behind
each other's row locks instead of deadlocking; under READ COMMITTED a waiting UPDATE
re-evaluates its condition against the row as committed, so no cap is ever crossed.

Connecting, SQLite's transaction control and how failures are reported
(``LedgerUnavailable`` or ``StoreError``) live in ``_connect``; the tenant feed's
statements, and why its positions are gap-free in commit order, in ``_feed``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from tenantguard.errors import LedgerUnavailable, StoreError
from tenantguard.ledger import _feed
from tenantguard.ledger._base import (
    ChangeResult,
    EventRecord,
    IncreaseRequest,
    OverrideRecord,
    TenantChanges,
    TenantRecord,
    TenantSnapshot,
    UsageChange,
    UsageRow,
)
from tenantguard.ledger._connect import READ_ONLY, open_engine, store_error
from tenantguard.ledger._schema import (
    EVENTS,
    IDEMPOTENCY,
    OVERRIDES,
    REQUESTS,
    TENANTS,
    USAGE,
    frozen_json,
    migrate,
)

__all__ = ["SqlLedger"]

T = TypeVar("T")
Work = Callable[[sa.Connection], T]

_ATTEMPTS = 3
"""Rounds of ``change_usage`` before giving up on a key that keeps appearing and
vanishing (a concurrent twin racing a purge); one round is the rule."""


class SqlLedger:
    """A ``Ledger`` in SQLite (``sqlite:///path``) or PostgreSQL (``postgresql://…``).

    Opening migrates the database to the latest schema (see ``_schema``) and raises
    ``SchemaVersionError`` when the database is newer than this code.

    A call that has not answered after ``call_timeout`` seconds (default: SQLite's
    ``busy_timeout`` plus 5) raises ``LedgerUnavailable``: a server that hangs with its
    connections open (stopped, or a network that drops packets) is noticed by no socket
    option, and a caller must not wait on it for ever. The call itself goes on to its
    end on its thread, as a cancelled one does, so retry with an idempotency key.
    """

    def __init__(
        self, url: str, *, busy_timeout: float = 10.0, call_timeout: float | None = None
    ) -> None:
        self._call_timeout = busy_timeout + 5.0 if call_timeout is None else call_timeout
        engine, serial = open_engine(url, busy_timeout)
        self._engine = engine
        self._serial = serial
        self._closed = False
        self._calls = threading.Condition()  # guards _closed and _in_flight
        self._in_flight = 0
        self._sqlite = engine.dialect.name == "sqlite"
        try:
            migrate(engine)
        except SQLAlchemyError as error:
            engine.dispose()
            raise store_error(error) from error
        except BaseException:
            engine.dispose()
            raise

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    async def _call(self, work: Work[T], *, read_only: bool = False) -> T:
        # outside an event loop this raises before the call is made (SyncGuard restarts
        # such a call on its loop), so no coroutine is left unawaited
        asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._run, work, read_only), self._call_timeout
            )
        except TimeoutError:
            raise LedgerUnavailable(
                f"the ledger database did not answer within {self._call_timeout:g} s"
            ) from None

    def _run(self, work: Work[T], read_only: bool) -> T:
        with self._calls:
            if self._closed:
                raise RuntimeError("the ledger is closed")
            self._in_flight += 1
        try:
            with self._serial, self._engine.connect() as conn:
                if read_only:
                    conn.execution_options(**{READ_ONLY: True})
                return work(conn)
        except SQLAlchemyError as error:
            raise store_error(error) from error
        finally:
            with self._calls:
                self._in_flight -= 1
                self._calls.notify_all()

    def _insert_ignore(self, table: sa.Table, **values: Any) -> sa.Insert:
        """Insert a row unless its key exists; the row count says which happened.

        The one construct that differs by dialect; both compile it to the same SQL.
        SQLAlchemy keeps an INSERT's row count only when asked (``preserve_rowcount``);
        UPDATE and DELETE counts always come back."""
        insert = sqlite.insert(table) if self._sqlite else postgresql.insert(table)
        statement = insert.values(**values).on_conflict_do_nothing()
        return statement.execution_options(preserve_rowcount=True)

    # tenants

    async def upsert_tenant(
        self, tenant: str, plan: str, metadata: Mapping[str, Any] | None, now: float
    ) -> tuple[TenantRecord, TenantRecord | None]:
        given = None if metadata is None else frozen_json(metadata)

        def work(conn: sa.Connection) -> tuple[TenantRecord, TenantRecord | None]:
            with conn.begin():
                new = TenantRecord(tenant, plan, given or frozen_json({}), now, now)
                insert = self._insert_ignore(TENANTS, **_tenant_values(new))
                if conn.execute(insert).rowcount == 1:
                    _feed.append(conn, tenant, now)
                    return new, None
                where = TENANTS.c.tenant == tenant
                row = conn.execute(sa.select(TENANTS).where(where).with_for_update()).one()
                before = _tenant(row)
                kept = before.metadata if given is None else given
                record = TenantRecord(tenant, plan, kept, before.created_at, now)
                conn.execute(sa.update(TENANTS).where(where).values(**_tenant_values(record)))
                _feed.append(conn, tenant, now)
                return record, before

        return await self._call(work)

    async def get_tenant(self, tenant: str) -> TenantRecord | None:
        def work(conn: sa.Connection) -> TenantRecord | None:
            row = conn.execute(sa.select(TENANTS).where(TENANTS.c.tenant == tenant)).first()
            return None if row is None else _tenant(row)

        return await self._call(work, read_only=True)

    async def delete_tenant(self, tenant: str, *, now: float | None = None) -> bool:
        statement = sa.delete(TENANTS).where(TENANTS.c.tenant == tenant)
        return await self._delete(statement, tenant, now)

    async def list_tenants(self, *, prefix: str = "", limit: int = 1000) -> list[TenantRecord]:
        query = sa.select(TENANTS).order_by(TENANTS.c.tenant).limit(max(limit, 0))
        if prefix:  # substr, not LIKE: LIKE ignores case on SQLite and treats % and _
            query = query.where(sa.func.substr(TENANTS.c.tenant, 1, len(prefix)) == prefix)
        return await self._rows(query, _tenant)

    # overrides

    async def put_override(self, record: OverrideRecord) -> None:
        values = {
            "value": record.value,
            "multiplier": record.multiplier,
            "reason": record.reason,
            "expires_at": record.expires_at,
            "created_by": record.created_by,
            "created_at": record.created_at,
        }

        def work(conn: sa.Connection) -> None:
            with conn.begin():
                insert = self._insert_ignore(
                    OVERRIDES, tenant=record.tenant, name=record.name, **values
                )
                if conn.execute(insert).rowcount == 0:
                    where = (OVERRIDES.c.tenant == record.tenant) & (
                        OVERRIDES.c.name == record.name
                    )
                    conn.execute(sa.update(OVERRIDES).where(where).values(**values))
                _feed.append(conn, record.tenant, record.created_at)

        await self._call(work)

    async def delete_override(self, tenant: str, name: str, *, now: float | None = None) -> bool:
        where = (OVERRIDES.c.tenant == tenant) & (OVERRIDES.c.name == name)
        return await self._delete(sa.delete(OVERRIDES).where(where), tenant, now)

    async def overrides(self, tenant: str) -> list[OverrideRecord]:
        query = sa.select(OVERRIDES).where(OVERRIDES.c.tenant == tenant)
        return await self._rows(query.order_by(OVERRIDES.c.name), _override)

    # usage

    async def change_usage(
        self,
        tenant: str,
        changes: Sequence[UsageChange],
        *,
        idempotency_key: str | None,
        now: float,
    ) -> ChangeResult:
        changes = tuple(changes)

        def work(conn: sa.Connection) -> ChangeResult:
            return self._change_usage(conn, tenant, changes, idempotency_key, now)

        return await self._call(work)

    def _change_usage(
        self,
        conn: sa.Connection,
        tenant: str,
        changes: tuple[UsageChange, ...],
        key: str | None,
        now: float,
    ) -> ChangeResult:
        for _ in range(_ATTEMPTS):
            with conn.begin() as transaction:
                stored = _stored(conn, tenant, key)
                if stored is not None:
                    return stored
                result = self._apply(conn, tenant, changes, now)
                if result.ok:
                    if self._remember(conn, tenant, key, result, now):
                        return result
                    transaction.rollback()  # a concurrent twin stored first: replay it
                    continue
                transaction.rollback()
            # refused: nothing was applied; answer, and remember, with the values as they are
            with conn.begin():
                stored = _stored(conn, tenant, key)
                if stored is not None:
                    return stored
                refusal = ChangeResult(_current(conn, tenant, changes), result.refused)
                if self._remember(conn, tenant, key, refusal, now):
                    return refusal
        raise StoreError(f"idempotency key {key!r} of tenant {tenant!r} could not be settled")

    def _apply(
        self, conn: sa.Connection, tenant: str, changes: tuple[UsageChange, ...], now: float
    ) -> ChangeResult:
        """Apply every change in key order; report the lowest refused index.

        A change's outcome depends only on earlier changes to the same counter, which the
        stable sort keeps in front of it, so the lowest refused index is the one a pass in
        the given order would have stopped at.
        """
        used = [0] * len(changes)
        refused: list[int] = []
        order = sorted(range(len(changes)), key=lambda i: _counter(changes[i]))
        for index in order:
            change = changes[index]
            where = _usage_row(tenant, change)
            quota, scope, period = _counter(change)
            conn.execute(
                self._insert_ignore(
                    USAGE, tenant=tenant, quota=quota, scope=scope, period=period,
                    used=0, updated_at=now,
                )
            )  # fmt: skip
            total = USAGE.c.used + change.amount
            new = sa.case((total < 0, 0), else_=total) if change.amount < 0 else total
            update = sa.update(USAGE).where(where).values(used=new, updated_at=now)
            if change.amount > 0 and change.limit is not None:
                update = update.where(total <= change.limit)
            if conn.execute(update).rowcount != 1:
                refused.append(index)
                continue
            used[index] = conn.execute(sa.select(USAGE.c.used).where(where)).scalar_one()
        return ChangeResult(tuple(used), min(refused) if refused else None)

    def _remember(
        self,
        conn: sa.Connection,
        tenant: str,
        key: str | None,
        result: ChangeResult,
        now: float,
    ) -> bool:
        """Store ``result`` under ``key``; false if a twin's result is there already."""
        if key is None:
            return True
        stored = {"used": list(result.used), "refused": result.refused}
        insert = self._insert_ignore(
            IDEMPOTENCY, tenant=tenant, key=key, result=stored, created_at=now
        )
        return conn.execute(insert).rowcount == 1

    async def set_usage(
        self, tenant: str, quota: str, scope: str, period: str, used: int, now: float
    ) -> None:
        if used < 0:
            raise ValueError(f"usage must be zero or more, not {used}")
        change = UsageChange(quota, scope, period, 0, None)

        def work(conn: sa.Connection) -> None:
            with conn.begin():
                insert = self._insert_ignore(
                    USAGE, tenant=tenant, quota=quota, scope=scope, period=period,
                    used=used, updated_at=now,
                )  # fmt: skip
                if conn.execute(insert).rowcount == 0:
                    update = sa.update(USAGE).where(_usage_row(tenant, change))
                    conn.execute(update.values(used=used, updated_at=now))

        await self._call(work)

    async def usage(self, tenant: str, *, quota: str | None = None) -> list[UsageRow]:
        query = sa.select(USAGE).where(USAGE.c.tenant == tenant)
        if quota is not None:
            query = query.where(USAGE.c.quota == quota)
        query = query.order_by(USAGE.c.quota, USAGE.c.scope, USAGE.c.period)
        return await self._rows(query, lambda row: UsageRow(**row._mapping))

    # increase requests

    async def add_request(self, request: IncreaseRequest) -> None:
        def work(conn: sa.Connection) -> None:
            with conn.begin():
                insert = self._insert_ignore(REQUESTS, **_request_values(request))
                if conn.execute(insert).rowcount == 0:
                    raise ValueError(f"increase request {request.id!r} already exists")

        await self._call(work)

    async def get_request(self, request_id: str) -> IncreaseRequest | None:
        rows = await self._rows(sa.select(REQUESTS).where(REQUESTS.c.id == request_id), _request)
        return rows[0] if rows else None

    async def list_requests(
        self, *, status: str | None = None, tenant: str | None = None, limit: int = 1000
    ) -> list[IncreaseRequest]:
        query = sa.select(REQUESTS)
        if status is not None:
            query = query.where(REQUESTS.c.status == status)
        if tenant is not None:
            query = query.where(REQUESTS.c.tenant == tenant)
        query = query.order_by(REQUESTS.c.created_at, REQUESTS.c.id).limit(max(limit, 0))
        return await self._rows(query, _request)

    async def update_request(self, request: IncreaseRequest) -> None:
        def work(conn: sa.Connection) -> None:
            with conn.begin():
                update = sa.update(REQUESTS).where(REQUESTS.c.id == request.id)
                if conn.execute(update.values(**_request_values(request))).rowcount == 0:
                    raise KeyError(f"no increase request {request.id!r}")

        await self._call(work)

    # events

    async def add_events(self, events: Sequence[EventRecord]) -> None:
        rows = [
            {"tenant": e.tenant, "kind": e.kind, "name": e.name, "at": e.at}
            | {"data": dict(frozen_json(e.data))}  # refuse what JSON cannot hold, up front
            for e in events
        ]
        if not rows:
            return

        def work(conn: sa.Connection) -> None:
            with conn.begin():
                conn.execute(sa.insert(EVENTS), rows)

        await self._call(work)

    async def events(
        self,
        tenant: str,
        *,
        since: float | None = None,
        kinds: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        query = sa.select(EVENTS).where(EVENTS.c.tenant == tenant)
        if since is not None:
            query = query.where(EVENTS.c.at >= since)
        if kinds is not None:
            query = query.where(EVENTS.c.kind.in_(list(kinds)))
        query = query.order_by(EVENTS.c.at.desc(), EVENTS.c.id.desc()).limit(max(limit, 0))
        return await self._rows(query, _event)

    async def purge(self, *, events_before: float, keys_before: float) -> int:
        def work(conn: sa.Connection) -> int:
            with conn.begin():
                events = conn.execute(sa.delete(EVENTS).where(EVENTS.c.at < events_before))
                keys = conn.execute(
                    sa.delete(IDEMPOTENCY).where(IDEMPOTENCY.c.created_at < keys_before)
                )
                return events.rowcount + keys.rowcount + _feed.purge_feed(conn, keys_before)

        return await self._call(work)

    # the tenant feed (see ``_feed``)

    async def tenant_snapshot(self) -> TenantSnapshot:
        def work(conn: sa.Connection) -> TenantSnapshot:
            with conn.begin():
                return _feed.snapshot(conn)

        return await self._call(work, read_only=True)

    async def tenant_changes(self, after: int, *, limit: int = 1000) -> TenantChanges:
        def work(conn: sa.Connection) -> TenantChanges:
            with conn.begin():
                return _feed.changes(conn, after, limit)

        return await self._call(work, read_only=True)

    async def ping(self) -> bool:
        def work(conn: sa.Connection) -> bool:
            with conn.begin():
                return bool(conn.execute(sa.select(1)).scalar_one() == 1)

        try:
            return await self._call(work, read_only=True)
        except (StoreError, RuntimeError):
            return False

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        """Wait out calls already running (a cancelled caller's transaction still runs to
        its end on its thread), so every connection is back in the pool to be closed."""
        with self._calls:
            if self._closed:
                return
            self._closed = True
            self._calls.notify_all()
            # a call stuck on a hung server must not hold shutdown for ever either
            self._calls.wait_for(lambda: self._in_flight == 0, timeout=self._call_timeout)
        self._engine.dispose()

    # helpers

    async def _rows(self, query: sa.Select[Any], record: Callable[[sa.Row[Any]], T]) -> list[T]:
        def work(conn: sa.Connection) -> list[T]:
            with conn.begin():
                return [record(row) for row in conn.execute(query)]

        return await self._call(work, read_only=True)

    async def _delete(self, statement: sa.Delete, tenant: str, now: float | None) -> bool:
        """Delete; when that removed something, append ``tenant``'s feed row in the same
        transaction."""

        def work(conn: sa.Connection) -> bool:
            with conn.begin():
                if conn.execute(statement).rowcount == 0:
                    return False
                _feed.append(conn, tenant, now)
                return True

        return await self._call(work)


# --- rows and records -----------------------------------------------------------------


def _counter(change: UsageChange) -> tuple[str, str, str]:
    return change.quota, change.scope, change.period


def _usage_row(tenant: str, change: UsageChange) -> sa.ColumnElement[bool]:
    return sa.and_(
        USAGE.c.tenant == tenant,
        USAGE.c.quota == change.quota,
        USAGE.c.scope == change.scope,
        USAGE.c.period == change.period,
    )


def _current(conn: sa.Connection, tenant: str, changes: tuple[UsageChange, ...]) -> tuple[int, ...]:
    used = USAGE.c.used
    return tuple(
        conn.execute(sa.select(used).where(_usage_row(tenant, change))).scalar() or 0
        for change in changes
    )


def _stored(conn: sa.Connection, tenant: str, key: str | None) -> ChangeResult | None:
    if key is None:
        return None
    where = (IDEMPOTENCY.c.tenant == tenant) & (IDEMPOTENCY.c.key == key)
    stored = conn.execute(sa.select(IDEMPOTENCY.c.result).where(where)).scalar()
    if stored is None:
        return None
    return ChangeResult(tuple(stored["used"]), stored["refused"], replayed=True)


def _tenant_values(record: TenantRecord) -> dict[str, Any]:
    return {
        "tenant": record.tenant,
        "plan": record.plan,
        "metadata": dict(record.metadata),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def _tenant(row: sa.Row[Any]) -> TenantRecord:
    fields = row._asdict()
    return TenantRecord(**fields | {"metadata": MappingProxyType(fields["metadata"])})


def _override(row: sa.Row[Any]) -> OverrideRecord:
    return OverrideRecord(**row._mapping)


_REQUEST_FIELDS = tuple(
    "limit" if column.name == "limit_name" else column.name for column in REQUESTS.columns
)


def _request_values(request: IncreaseRequest) -> dict[str, Any]:
    values = {
        column.name: getattr(request, field)
        for column, field in zip(REQUESTS.columns, _REQUEST_FIELDS, strict=True)
    }
    values["endpoints"] = list(request.endpoints)
    return values


def _request(row: sa.Row[Any]) -> IncreaseRequest:
    fields = dict(zip(_REQUEST_FIELDS, row, strict=True))
    fields["endpoints"] = tuple(fields["endpoints"])
    return IncreaseRequest(**fields)


def _event(row: sa.Row[Any]) -> EventRecord:
    return EventRecord(
        tenant=row.tenant,
        kind=row.kind,
        name=row.name,
        at=row.at,
        data=MappingProxyType(row.data),
        id=row.id,
    )
