"""The ledger: durable tenant state (tenants, overrides, counts, usage, idempotency keys,
increase requests, events), and a feed of tenant changes for the engines that keep
tenants in memory. One interface, ``Ledger``; ``open_ledger`` picks the implementation
from a URL."""

from __future__ import annotations

from tenantguard.ledger._base import (
    ChangeResult,
    EventRecord,
    IncreaseRequest,
    Ledger,
    OverrideRecord,
    TenantChanges,
    TenantRecord,
    TenantSnapshot,
    UsageChange,
    UsageRow,
)
from tenantguard.ledger._memory import MemoryLedger
from tenantguard.ledger._schema import SchemaVersionError
from tenantguard.ledger._sql import SqlLedger

__all__ = [
    "ChangeResult",
    "EventRecord",
    "IncreaseRequest",
    "Ledger",
    "MemoryLedger",
    "OverrideRecord",
    "SchemaVersionError",
    "SqlLedger",
    "TenantChanges",
    "TenantRecord",
    "TenantSnapshot",
    "UsageChange",
    "UsageRow",
    "open_ledger",
]


def open_ledger(url: str) -> Ledger:
    """The ledger a URL names; a SQL ledger is migrated to the latest schema on open.

    - ``memory``: in-process, gone with the process (development, tests);
    - ``sqlite:///path/to/file.db``: the embedded durable default, one file, WAL;
    - ``sqlite://``: SQLite in memory, one connection: for tests only, *not durable*;
    - ``postgresql://user:pass@host/db`` (driven by psycopg 3): shared by every replica.
    """
    if url in ("memory", "memory://"):
        return MemoryLedger()
    scheme, separator, _ = url.partition("://")
    if separator and scheme.split("+")[0] in ("sqlite", "postgresql", "postgres"):
        return SqlLedger(url)
    raise ValueError(
        # the scheme, not the URL: a URL can hold a password
        f"ledger URL scheme {scheme or url!r} is not supported; expected one of: memory, "
        "sqlite:///PATH (sqlite:// keeps it in memory, for tests), postgresql://USER@HOST/DB"
    )
