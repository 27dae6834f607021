"""The policy document, version 1, as validated immutable data (see DESIGN.md).

This module only says what a well-formed document looks like, field by field. Rules
that span fields (plan names in ``limits``, rule name clashes, route ambiguity) are
checked in ``_checks`` where each problem can be located in the file.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from tenantguard._durations import parse_duration
from tenantguard._paths import parse_template

__all__ = [
    "ALGORITHMS",
    "UNAVAILABLE",
    "UNLIMITED",
    "Enforcement",
    "Events",
    "LimitValue",
    "Match",
    "Plan",
    "PolicyDocument",
    "Quota",
    "RateLimit",
]

UNLIMITED = "unlimited"
UNAVAILABLE = "unavailable"
ALGORITHMS = ("fixed-window", "sliding-window", "token-bucket", "gcra", "concurrency")
KEY_PARTS = ("tenant", "client", "ip", "user")
_NAME = r"^[a-z0-9][a-z0-9._-]*$"
_METHOD = re.compile(r"^[A-Z]+$")

Enforcement = Literal["hard", "soft", "contract"]


def _limit_value(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if value in (UNLIMITED, UNAVAILABLE):
        return str(value)
    raise ValueError(f"expected a whole number >= 0, 'unlimited' or 'unavailable', got {value!r}")


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 10s, 1m, 1h or 14d, got {value!r}")
    return parse_duration(value)


def _method(value: Any) -> str:
    if not isinstance(value, str) or not _METHOD.match(value.upper()):
        raise ValueError(f"expected an HTTP method such as GET or POST, got {value!r}")
    return value.upper()


def _template(value: str) -> str:
    parse_template(value)
    return value


def _key_part(value: Any) -> str:
    if isinstance(value, str) and (
        value in KEY_PARTS or (value.startswith("header:") and len(value) > len("header:"))
    ):
        return value.lower() if value.startswith("header:") else value
    raise ValueError(f"expected one of tenant, client, ip, user or header:<name>, got {value!r}")


LimitValue = Annotated[int | str, BeforeValidator(_limit_value)]
Duration = Annotated[float, BeforeValidator(_duration)]
Method = Annotated[str, BeforeValidator(_method)]
Template = Annotated[str, AfterValidator(_template)]
KeyPart = Annotated[str, BeforeValidator(_key_part)]
Name = Annotated[str, Field(pattern=_NAME, max_length=128)]
Percent = Annotated[StrictInt, Field(ge=1, le=100)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Plan(_Model):
    name: Name
    enforcement: Enforcement
    description: str = ""


class Match(_Model):
    methods: tuple[Method, ...] | None = Field(default=None, min_length=1)
    paths: tuple[Template, ...] = Field(min_length=1)
    except_: tuple[Template, ...] = Field(default=(), alias="except")


class RateLimit(_Model):
    name: Name
    description: str = ""
    group: Name = "endpoint"
    match: Match
    per: tuple[KeyPart, ...] = Field(default=("tenant",), min_length=1)
    algorithm: Literal["fixed-window", "sliding-window", "token-bucket", "gcra", "concurrency"] = (
        "fixed-window"
    )
    window: Duration | None = None
    lease_ttl: Duration | None = None
    limits: dict[str, LimitValue]
    burst: dict[str, Annotated[StrictInt, Field(ge=1)]] | None = None
    mode: Literal["enforce", "shadow"] = "enforce"
    warning_threshold: Percent | None = None


class Quota(_Model):
    name: Name
    description: str = ""
    counts_toward: tuple[Name, ...] = ()
    per: Name | None = None
    period: Literal["day", "week", "month", "year"] | None = None
    limits: dict[str, LimitValue]
    warning_threshold: Percent | None = None


class Events(_Model):
    retention: Duration = 14 * 86400.0


class PolicyDocument(_Model):
    version: Literal[1]
    plans: tuple[Plan, ...] = Field(min_length=1)
    default_plan: Name
    headers: tuple[Literal["okta", "ietf", "github"], ...] = ("ietf",)
    errors: Literal["problem+json", "okta", "logto"] = "problem+json"
    warning_threshold: Percent = 60
    events: Events = Events()
    on_store_error: Literal["allow", "deny"] = "allow"
    rate_limits: tuple[RateLimit, ...] = ()
    quotas: tuple[Quota, ...] = ()
    entitlements: dict[Name, dict[str, Any]] = Field(default_factory=dict)
