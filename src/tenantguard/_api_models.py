"""The JSON shapes of HTTP API v1 (DESIGN.md), as pydantic models.

Request models are strict and closed: a string is never taken for a number, ``true`` is
never taken for ``1``, and an unknown field is an error rather than a silently ignored
typo. Every string a client sends may end up in the ledger, so strings that no database
can store faithfully (NUL, lone surrogates) are refused here, and numbers are bounded so
that a count always fits a 64-bit column.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "MAX_COUNT",
    "MAX_ID_LENGTH",
    "ApproveBody",
    "CheckBody",
    "CheckResult",
    "EventList",
    "EventOut",
    "Health",
    "IncreaseBody",
    "IncreaseList",
    "IncreaseOut",
    "LimitsOut",
    "OverrideBody",
    "OverrideOut",
    "Problem",
    "QuotaChangeBody",
    "Readiness",
    "RejectBody",
    "TenantBody",
    "TenantDetail",
    "TenantList",
    "TenantOut",
    "TenantStateOut",
    "UsageBody",
    "UsageOut",
    "check_text",
]

MAX_COUNT = 2**53 - 1
"""The largest count, amount or limit the API accepts: exact in every JSON client and
far inside a 64-bit column, so ``used + amount`` can never overflow one."""
MAX_ID_LENGTH = 1024
MAX_MULTIPLIER = 1_000_000.0
MAX_INSTANT = 253_402_300_799.0  # 9999-12-31T23:59:59Z
_MAX_METADATA_DEPTH = 32


def check_text(value: str) -> str:
    """Refuse what SQLite or PostgreSQL would reject or change: NUL and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > _MAX_METADATA_DEPTH:
        raise ValueError(f"must not nest deeper than {_MAX_METADATA_DEPTH} levels")
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT:
        raise ValueError(f"integers must be within ±{MAX_COUNT}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    _check_json(value)
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with /, such as /api/v1/users")
    return check_text(value)


# lengths are checked on the plain string, before check_text: pydantic words a length
# error on an annotated type as if it were a list ("at least 1 item")
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(check_text)]
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(check_text)]
Reason = Annotated[str, Field(max_length=4096), AfterValidator(check_text)]
RequestPath = Annotated[str, Field(min_length=1, max_length=8192), AfterValidator(_check_path)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Amount = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Instant = Annotated[float, Field(ge=0, le=MAX_INSTANT, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# problems ---------------------------------------------------------------------------


class FieldError(_Out):
    field: str = Field(description="Dotted path of the offending field, e.g. `tenant`.")
    message: str


class Problem(_Out):
    """RFC 9457 problem details, with a stable ``code`` to switch on."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str = Field(examples=["urn:tenantguard:problem:invalid_request"])
    title: str
    status: int
    detail: str
    code: str = Field(
        description="Stable error code: unauthorized, forbidden, malformed_json, "
        "invalid_request, body_too_large, not_found, method_not_allowed, tenant_not_found, "
        "quota_not_found, limit_not_found, request_not_found, override_not_found, "
        "lease_not_found, quota_exceeded, usage_exceeded, override_refused, "
        "request_already_decided, unknown_plan, store_unavailable, ledger_unavailable, "
        "not_ready, internal_error."
    )
    errors: list[FieldError] | None = Field(
        default=None, description="For `invalid_request`: every offending field."
    )
    quota: str | None = Field(default=None, description="For quota errors: the quota refused.")
    limit: int | None = None
    used: int | None = None
    requested: int | None = None


# decisions --------------------------------------------------------------------------


class CheckBody(_Body):
    """``POST /v1/check``: count one request of ``tenant`` and say whether it may pass.

    ``headers`` feeds rules keyed ``per: header:<name>``.
    """

    tenant: Id
    method: Annotated[str, Field(pattern=r"^[A-Za-z]+$", max_length=32)]
    path: RequestPath
    client: Annotated[str, Field(max_length=MAX_ID_LENGTH), AfterValidator(check_text)] | None = (
        None
    )
    ip: Annotated[str, Field(max_length=64), AfterValidator(check_text)] | None = None
    user: Annotated[str, Field(max_length=MAX_ID_LENGTH), AfterValidator(check_text)] | None = None
    headers: Annotated[dict[Name, Reason], Field(max_length=64)] | None = None
    cost: Amount = 1


class RuleOutcome(_Out):
    rule: str
    group: str
    algorithm: str
    outcome: Literal["allowed", "denied", "uncounted", "shadow-denied", "unlimited", "unavailable"]
    limit: int | None
    remaining: int | None
    reset: int | None
    shadow: bool
    reason: str | None


class CheckResult(_Out):
    """The decision. ``status`` is what to answer the client (200, 429 or 403); the
    request to tenantguard itself succeeded either way."""

    allowed: bool
    status: int
    tenant: str
    plan: str
    rule: str | None
    limit: int | None
    remaining: int | None
    reset: int | None = Field(description="Epoch second when the binding rule is whole again.")
    retry_after: int | None = Field(description="Seconds to wait, when denied.")
    reason: str | None
    degraded: bool
    headers: dict[str, str]
    checks: list[RuleOutcome]
    lease: str | None = Field(description="Concurrency lease to release when done.")


# tenants ----------------------------------------------------------------------------


class TenantBody(_Body):
    """Create or change a tenant. Omitting ``metadata`` keeps what the tenant had."""

    plan: Name
    metadata: Metadata | None = None


class TenantOut(_Out):
    tenant: str
    plan: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float


class OverrideOut(_Out):
    tenant: str
    name: str
    value: int | None
    multiplier: float | None
    reason: str
    expires_at: float | None
    created_by: str
    created_at: float


class TenantDetail(TenantOut):
    overrides: list[OverrideOut]


class TenantList(_Out):
    tenants: list[TenantOut]


class RateLimitOut(_Out):
    name: str
    group: str
    algorithm: str
    window: float | None
    value: int | str = Field(description="A number, `unlimited` or `unavailable`.")
    source: str = Field(description="`plan`, `override` or `contract-default`.")
    burst: int | None
    mode: str


class ScopeUsage(_Out):
    scope: str | None
    used: int


class QuotaOut(_Out):
    name: str
    limit: int | str
    source: str
    per: str | None
    period: str | None
    resets_at: float | None
    used: int | None
    usage: list[ScopeUsage]


class LimitsOut(_Out):
    tenant: str
    plan: str
    enforcement: str
    rate_limits: list[RateLimitOut]
    quotas: list[QuotaOut]
    entitlements: dict[str, Any]


class OverrideBody(_Body):
    """Give exactly one of ``value`` (replaces the plan's) or ``multiplier`` (scales it)."""

    value: Count | None = None
    multiplier: Annotated[float, Field(gt=0, le=MAX_MULTIPLIER, allow_inf_nan=False)] | None = None
    reason: Annotated[Reason, Field(min_length=1)]
    expires_at: Instant | None = None


# quotas -----------------------------------------------------------------------------


class QuotaChangeBody(_Body):
    amount: Amount = 1
    scope: Id | None = None
    idempotency_key: Name | None = None


class UsageBody(_Body):
    used: Count
    scope: Id | None = None


class UsageOut(_Out):
    quota: str
    scope: str | None
    used: int
    limit: int | None
    remaining: int | None
    period: str | None
    resets_at: float | None
    source: str


# increase requests ------------------------------------------------------------------


class IncreaseBody(_Body):
    limit: Name
    requested: Amount
    reason: Annotated[Reason, Field(min_length=1)]
    avg_rps: Rate | None = None
    peak_rps: Rate | None = None
    burst_pattern: Reason | None = None
    endpoints: Annotated[
        list[Annotated[str, Field(max_length=8192), AfterValidator(check_text)]],
        Field(max_length=100),
    ] = Field(default_factory=list)
    needed_by: Annotated[str, Field(max_length=64), AfterValidator(check_text)] | None = None


class IncreaseOut(_Out):
    id: str
    tenant: str
    limit: str
    requested: int
    reason: str
    status: Literal["pending", "approved", "rejected"]
    avg_rps: float | None
    peak_rps: float | None
    burst_pattern: str | None
    endpoints: list[str]
    needed_by: str | None
    created_at: float
    decided_at: float | None
    decided_by: str | None
    decision_reason: str | None
    approved_value: int | None
    approved_expires_at: float | None


class IncreaseList(_Out):
    requests: list[IncreaseOut]


class ApproveBody(_Body):
    """Approve; ``value`` defaults to what was requested."""

    value: Count | None = None
    expires_at: Instant | None = None
    reason: Reason = ""


class RejectBody(_Body):
    reason: Annotated[Reason, Field(min_length=1)]


# events and health ------------------------------------------------------------------


class EventOut(_Out):
    id: int | None
    tenant: str
    kind: str
    name: str
    at: float
    data: dict[str, Any]


class EventList(_Out):
    events: list[EventOut]


class Health(_Out):
    status: str


class TenantStateOut(_Out):
    """How current the tenant state held in memory is (``Guard.tenant_status``)."""

    ledger: str = Field(
        description="`ok`: following the ledger; `down`: the ledger cannot be reached, checks "
        "run on the last known state; `loading`: no state read yet."
    )
    stale_seconds: float | None = Field(
        description="Seconds since the state was last confirmed current by the ledger; "
        "null until it was read once."
    )
    tenants: int = Field(description="Tenants held in memory.")


class Readiness(_Out):
    """Checks can be served and a policy is in force; ``policy`` names its file. A failed
    reload of that file is reported in ``reload_error`` but keeps the service ready: it
    goes on serving the last good policy, and one bad edit must not take every replica
    out of rotation. So does a ledger outage once the tenant state is loaded: checks run
    on it. When not ready the answer is a 503 problem whose ``checks`` say what is down.
    ``checks`` and ``tenant_state`` are shown to the admin token only."""

    status: Literal["ready"]
    policy: str
    reload_error: str | None = None
    checks: dict[str, Literal["ok", "down"]] | None = Field(
        default=None, description="Each store's answer to a ping: `ledger`, `counters`."
    )
    tenant_state: TenantStateOut | None = None
