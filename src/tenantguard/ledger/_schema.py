"""The ledger's tables, how JSON is stored in them, and the migrations that build them.

One schema serves SQLite and PostgreSQL. Identifier columns compare bytewise on both
(PostgreSQL's ``C`` collation; SQLite's default is already binary), so listings come back
in the same order as the in-memory ledger's Python sort, whatever the server's locale.
Instants are epoch seconds as doubles: the guard's clock decides time, not the database.

Migrations are an append-only list. ``migrate`` runs, in one transaction per step, the
step's DDL and a row in ``schema_version``; it inserts that row *first*, so when two
replicas open a database at once the second blocks on the first's row and then fails on
its key, rolls back, and on retry finds the step done. A database whose version is ahead
of this code is refused rather than written with a schema it does not understand.
A released step is never edited: a later change to a table is a new step (and, if the
step alters a table defined here, the version-1 form moves into step 1).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, ProgrammingError

from tenantguard.errors import TenantguardError

__all__ = [
    "EVENTS",
    "FEED",
    "FEED_HEAD",
    "IDEMPOTENCY",
    "MIGRATIONS",
    "OVERRIDES",
    "REQUESTS",
    "SCHEMA_VERSION",
    "TENANTS",
    "USAGE",
    "SchemaVersionError",
    "dump_json",
    "frozen_json",
    "load_json",
    "migrate",
]

dump_json: Callable[[Any], str] = functools.partial(
    json.dumps, allow_nan=False, ensure_ascii=False, separators=(",", ":")
)
"""NaN and infinities are refused: PostgreSQL's ``json`` rejects them, so both
ledgers do, and the in-memory one stores exactly what a database would give back."""

load_json: Callable[[str], Any] = json.loads


def frozen_json(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """What a JSON column gives back for ``value``, read-only."""
    return MappingProxyType(load_json(dump_json(dict(value))))


class SchemaVersionError(TenantguardError):
    """The ledger database was migrated by a newer tenantguard than this one."""


Key: sa.types.TypeEngine[str] = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
Instant: sa.types.TypeEngine[float] = sa.Double()
Count: sa.types.TypeEngine[int] = sa.BigInteger()
EventId: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(
    sa.Integer(), "sqlite"
)  # SQLite: the rowid alias

METADATA = sa.MetaData()

TENANTS = sa.Table(
    "tenants",
    METADATA,
    sa.Column("tenant", Key, primary_key=True),
    sa.Column("plan", Key, nullable=False),
    sa.Column("metadata", sa.JSON(), nullable=False),
    sa.Column("created_at", Instant, nullable=False),
    sa.Column("updated_at", Instant, nullable=False),
)

OVERRIDES = sa.Table(
    "overrides",
    METADATA,
    sa.Column("tenant", Key, primary_key=True),
    sa.Column("name", Key, primary_key=True),
    sa.Column("value", Count),
    sa.Column("multiplier", sa.Double()),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("expires_at", Instant),
    sa.Column("created_by", sa.Text(), nullable=False),
    sa.Column("created_at", Instant, nullable=False),
)

USAGE = sa.Table(
    "usage",
    METADATA,
    sa.Column("tenant", Key, primary_key=True),
    sa.Column("quota", Key, primary_key=True),
    sa.Column("scope", Key, primary_key=True),
    sa.Column("period", Key, primary_key=True),
    sa.Column("used", Count, nullable=False),
    sa.Column("updated_at", Instant, nullable=False),
)

IDEMPOTENCY = sa.Table(
    "idempotency",
    METADATA,
    sa.Column("tenant", Key, primary_key=True),
    sa.Column("key", Key, primary_key=True),
    sa.Column("result", sa.JSON(), nullable=False),
    sa.Column("created_at", Instant, nullable=False),
    sa.Index("ix_idempotency_created_at", "created_at"),
)

REQUESTS = sa.Table(
    "increase_requests",
    METADATA,
    sa.Column("id", Key, primary_key=True),
    sa.Column("tenant", Key, nullable=False),
    sa.Column("limit_name", Key, nullable=False),  # "limit" is reserved in SQL
    sa.Column("requested", Count, nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("status", Key, nullable=False),
    sa.Column("avg_rps", sa.Double()),
    sa.Column("peak_rps", sa.Double()),
    sa.Column("burst_pattern", sa.Text()),
    sa.Column("endpoints", sa.JSON(), nullable=False),
    sa.Column("needed_by", sa.Text()),
    sa.Column("created_at", Instant, nullable=False),
    sa.Column("decided_at", Instant),
    sa.Column("decided_by", sa.Text()),
    sa.Column("decision_reason", sa.Text()),
    sa.Column("approved_value", Count),
    sa.Column("approved_expires_at", Instant),
    sa.Index("ix_increase_requests_status", "status", "created_at"),
    sa.Index("ix_increase_requests_tenant", "tenant", "created_at"),
)

EVENTS = sa.Table(
    "events",
    METADATA,
    sa.Column("id", EventId, primary_key=True, autoincrement=True),
    sa.Column("tenant", Key, nullable=False),
    sa.Column("kind", Key, nullable=False),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("at", Instant, nullable=False),
    sa.Column("data", sa.JSON(), nullable=False),
    sa.Index("ix_events_tenant_at", "tenant", "at"),
    sa.Index("ix_events_at", "at"),  # purge by age across tenants
)

FEED = sa.Table(
    "tenant_feed",
    METADATA,
    sa.Column("seq", EventId, primary_key=True, autoincrement=False),  # drawn from the head
    sa.Column("tenant", Key, nullable=False),
    sa.Column("at", Instant, nullable=False),  # the writer's clock: only purge reads it
    sa.Index("ix_tenant_feed_at", "at"),
)
"""One row per write to a tenant's record or overrides (see ``_feed``)."""

FEED_HEAD = sa.Table(
    "tenant_feed_head",
    METADATA,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("seq", Count, nullable=False),
    sa.CheckConstraint("id = 1", name="ck_tenant_feed_head_one_row"),
)
"""One row: the last position handed out. Its row lock orders the feed's writers."""

SCHEMA_VERSION = sa.Table(
    "schema_version",
    METADATA,
    sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("description", sa.Text(), nullable=False),
    # the database's own clock: a note for people, never read by tenantguard
    sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)

Step = Callable[[sa.Connection], None]


def _create(*tables: sa.Table) -> Step:
    def step(conn: sa.Connection) -> None:
        METADATA.create_all(conn, tables=list(tables), checkfirst=False)

    return step


def _create_feed(conn: sa.Connection) -> None:
    """The feed starts empty at position 0: what exists already is in every snapshot.

    Additive only: a replica still running version-1 code keeps working on the migrated
    database (though its tenant writes add no feed rows, so pollers see them only in
    their next snapshot); one started after the migration refuses the newer schema."""
    _create(FEED, FEED_HEAD)(conn)
    conn.execute(sa.insert(FEED_HEAD).values(id=1, seq=0))


MIGRATIONS: tuple[tuple[str, Step], ...] = (
    (
        "tenants, overrides, usage, idempotency keys, increase requests, events",
        _create(TENANTS, OVERRIDES, USAGE, IDEMPOTENCY, REQUESTS, EVENTS),
    ),
    ("tenant feed: a row per tenant change, and its head", _create_feed),
)
"""Step ``n`` (1-based) brings the schema from version ``n - 1`` to ``n``."""

_ATTEMPTS = len(MIGRATIONS) + 2
"""An opener loses a race at most once per thing another opener can create first (the
version table, then each step), so one more attempt than that always settles."""


def current_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table(SCHEMA_VERSION.name):
        return 0
    return conn.scalar(sa.select(sa.func.max(SCHEMA_VERSION.c.version))) or 0


def migrate(engine: sa.Engine) -> int:
    """Bring the database up to the latest version; return the version it is at."""
    attempt = 1
    while True:
        try:
            return _migrate(engine, len(MIGRATIONS))
        except (IntegrityError, ProgrammingError):
            # another process created the same table or step first (see the module docstring)
            if attempt == _ATTEMPTS:
                raise
            attempt += 1


def _migrate(engine: sa.Engine, latest: int) -> int:
    with engine.begin() as conn:
        SCHEMA_VERSION.create(conn, checkfirst=True)
    while True:
        with engine.begin() as conn:
            version = current_version(conn)
            if version > latest:
                raise SchemaVersionError(
                    f"the ledger database is at schema version {version}, but this "
                    f"tenantguard knows versions up to {latest}: upgrade tenantguard, "
                    "or point it at another database"
                )
            if version == latest:
                return version
            description, step = MIGRATIONS[version]
            conn.execute(
                sa.insert(SCHEMA_VERSION).values(version=version + 1, description=description)
            )
            step(conn)
