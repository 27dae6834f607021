"""Exceptions raised by tenantguard.

The tree, so callers can catch as broadly or narrowly as they need::

    TenantguardError
    ├── PolicyError          a policy file is invalid; carries every located problem
    ├── UnknownLeaseError    release() of a lease this guard never issued
    ├── StoreError           a counter store or the ledger failed; keeps the original as __cause__
    │   └── LedgerUnavailable    the ledger cannot be reached (.retry_after seconds); checks go on
    ├── SchemaVersionError   the ledger's database is newer than this code
    ├── QuotaExceeded        an acquisition would cross a cap (.status 403, or 429 for usage)
    ├── OverrideRefused      (also ValueError) an override a hard plan cannot take
    ├── RequestConflict      an increase request that was already decided
    └── UnknownQuotaError, UnknownLimitError, UnknownRequestError   (also KeyError)

``UnknownPlanError`` is a ``ValueError``: the caller named a plan the policy lacks.

Rate-limit denials are not exceptions: ``Guard.check`` returns a ``Decision`` whose
``allowed`` is false, because a denial is an expected answer, not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LedgerUnavailable",
    "PolicyError",
    "PolicyIssue",
    "StoreError",
    "TenantguardError",
    "UnknownLeaseError",
]


class TenantguardError(Exception):
    """Base of every error tenantguard raises on purpose."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy file, located so an editor can jump to it."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class PolicyError(TenantguardError):
    """A policy file could not be loaded. ``issues`` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class UnknownLeaseError(TenantguardError):
    """A lease id that was never issued (releasing an expired lease is not an error)."""


class StoreError(TenantguardError):
    """A counter store failed; the backend's own exception is chained as ``__cause__``."""


class LedgerUnavailable(StoreError):
    """The ledger cannot be reached (connection refused, timed out, database gone).

    Rate-limit checks do not raise it: they go on with the tenant state last read from
    the ledger. What needs the ledger itself (quota acquires and releases, admin
    writes) raises it, so a front door can answer 503 with ``Retry-After``.
    """

    retry_after: float = 1.0
