"""The tenant feed in SQL: what a write appends, and what a poller reads.

Engines keep every tenant in memory and poll ``tenant_changes(after)``. For that to be
safe the feed's positions must be gap-free in commit order: a poller that has read
position ``n`` must never later find a position below ``n`` committed, or it would skip
that change for good. A sequence or autoincrement column does not give this on
PostgreSQL: a transaction can draw 7, another draw 8 and commit first, and a poller
reading in between sees 8 and moves past 7.

So every write to a tenant's record or overrides ends, in its own transaction, with
``append``: it increments the one row of ``tenant_feed_head`` (``UPDATE … SET seq =
seq + 1 … RETURNING seq``) and inserts its feed row under that number. The UPDATE holds
the head row's lock until the transaction ends. The next writer's UPDATE waits for it
and then, under READ COMMITTED, works on the row as committed: it draws the next number
only once the holder has committed (the holder's number is then visible to every new
snapshot, since PostgreSQL makes a commit visible before it releases its locks) or
rolled back (the number is then drawn again: no gap). Positions thus commit in order,
one at a time. The head is taken last, after the rows the write changes, so its lock is
held only until the commit, and every writer takes its locks in one order (its data,
then the head), so none can deadlock on it. The price is that tenant writes commit one
at a time, which admin writes can afford. On SQLite ``BEGIN IMMEDIATE`` already makes
writers serial, and the same statements do the same.

Reading needs no more than READ COMMITTED (no REPEATABLE READ, so PostgreSQL and SQLite
run the same statements): ``changes`` and ``snapshot`` read the head *before* the rows
and the tenant state. Every position up to that head is committed then, so the state
read after it is at least as new as the cursor returned. A change past the cursor may
slip into the state as well; the next poll returns that tenant again, and re-reading a
tenant is idempotent. (SQLite's read transaction sees one snapshot throughout.)

Purging drops the oldest rows only up to the first row still young (``purge_feed``):
rows are dated by their writers' clocks, which need not rise with position, and what is
kept must stay a gap-free run up to the head, so a poller behind it can be told so.
"""

from __future__ import annotations

import sqlalchemy as sa

from tenantguard.ledger._base import (
    OverrideRecord,
    TenantChanges,
    TenantSnapshot,
    check_feed_arguments,
)
from tenantguard.ledger._schema import FEED, FEED_HEAD, OVERRIDES, TENANTS

__all__ = ["append", "changes", "purge_feed", "snapshot"]


def append(conn: sa.Connection, tenant: str, at: float | None) -> None:
    """Append ``tenant``'s feed row: the last statement of a write transaction.

    Undated (a delete whose caller gave no ``now``), the row takes the newest row's
    date: the ledger reads no clock, and the worst this costs is a purge that comes
    early for it, which only sends a poller that had not read it yet to a snapshot."""
    if at is None:
        newest = sa.select(FEED.c.at).order_by(FEED.c.seq.desc()).limit(1)
        at = conn.execute(newest).scalar() or 0.0
    draw = (
        sa.update(FEED_HEAD)
        .where(FEED_HEAD.c.id == 1)
        .values(seq=FEED_HEAD.c.seq + 1)
        .returning(FEED_HEAD.c.seq)
    )
    seq = conn.execute(draw).scalar_one()
    conn.execute(sa.insert(FEED).values(seq=seq, tenant=tenant, at=at))


def snapshot(conn: sa.Connection) -> TenantSnapshot:
    """Every tenant's plan and overrides, in a transaction the caller has begun."""
    cursor = _head(conn)  # first: the state read next is at least this new
    plans = sa.select(TENANTS.c.tenant, TENANTS.c.plan).order_by(TENANTS.c.tenant)
    taken = TenantSnapshot(cursor, {row[0]: row[1] for row in conn.execute(plans)}, {})
    overrides = sa.select(OVERRIDES).order_by(OVERRIDES.c.tenant, OVERRIDES.c.name)
    for row in conn.execute(overrides):
        taken.overrides.setdefault(row.tenant, []).append(OverrideRecord(**row._mapping))
    return taken


def changes(conn: sa.Connection, after: int, limit: int) -> TenantChanges:
    """The tenants with feed rows after ``after`` (at most ``limit`` rows), each with
    its state now, in a transaction the caller has begun."""
    check_feed_arguments(after, limit)
    head = _head(conn)  # first: every position up to it is committed, none can appear
    if after > head:  # a cursor from another database
        return TenantChanges(head, {}, {}, complete=False)
    rows = sa.select(FEED.c.seq, FEED.c.tenant).where(FEED.c.seq > after)
    found = conn.execute(rows.order_by(FEED.c.seq).limit(limit)).all()
    if (found[0].seq if found else head + 1) != after + 1:
        # positions have no gaps, so the one after ``after`` was purged
        return TenantChanges(head, {}, {}, complete=False)
    if not found:
        return TenantChanges(after, {}, {}, complete=True)
    cursor = found[-1].seq
    changed = sa.select(FEED.c.tenant).where(FEED.c.seq > after, FEED.c.seq <= cursor)
    plans: dict[str, str | None] = dict.fromkeys(sorted({row.tenant for row in found}))
    overrides: dict[str, list[OverrideRecord]] = {tenant: [] for tenant in plans}
    current = sa.select(TENANTS.c.tenant, TENANTS.c.plan).where(TENANTS.c.tenant.in_(changed))
    plans.update((row[0], row[1]) for row in conn.execute(current))
    theirs = (
        sa.select(OVERRIDES)
        .where(OVERRIDES.c.tenant.in_(changed))
        .order_by(OVERRIDES.c.tenant, OVERRIDES.c.name)
    )
    for row in conn.execute(theirs):
        overrides[row.tenant].append(OverrideRecord(**row._mapping))
    return TenantChanges(cursor, plans, overrides, complete=True)


def purge_feed(conn: sa.Connection, before: float) -> int:
    """Drop the rows dated before ``before`` that no younger row precedes; how many.

    One statement, so one snapshot decides both where the first young row is and what
    goes before it: a row committed meanwhile is neither seen nor deleted."""
    first_young = sa.select(sa.func.min(FEED.c.seq)).where(FEED.c.at >= before)
    bound = first_young.scalar_subquery()
    old = sa.delete(FEED).where(FEED.c.at < before, sa.or_(bound.is_(None), FEED.c.seq < bound))
    return conn.execute(old).rowcount


def _head(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(FEED_HEAD.c.seq).where(FEED_HEAD.c.id == 1)).scalar_one())
