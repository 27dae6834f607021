"""Problem answers (RFC 9457 ``application/problem+json``) for the HTTP service.

Every error the service gives is built here, so each has a stable ``code`` a client can
switch on and a ``title`` that does not change with the detail. ``translate`` is the one
table from the engine's exceptions to answers; what it does not know is a bug, logged
and answered 500 without details.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tenantguard.errors import LedgerUnavailable, StoreError, UnknownLeaseError
from tenantguard.increases import RequestConflict, UnknownRequestError
from tenantguard.overrides import OverrideRefused, UnknownLimitError
from tenantguard.quotas import QuotaExceeded, UnknownQuotaError
from tenantguard.tenants import UnknownPlanError

__all__ = [
    "INTERNAL",
    "PROBLEM",
    "ProblemError",
    "http_problem",
    "internal_problem",
    "invalid",
    "invalid_fields",
    "log",
    "retry_seconds",
    "translate",
    "validation_problem",
]

# the service's one logger, named after its public module
log = logging.getLogger("tenantguard.server")
PROBLEM = "application/problem+json"
_TITLES = {
    "unauthorized": "Missing or invalid bearer token",
    "forbidden": "This token may not use this route",
    "malformed_json": "Request body is not valid JSON",
    "invalid_request": "Request is not valid",
    "body_too_large": "Request body too large",
    "tenant_not_found": "No such tenant",
    "quota_not_found": "No such quota",
    "limit_not_found": "No such rate limit or quota",
    "request_not_found": "No such increase request",
    "override_not_found": "No such override",
    "lease_not_found": "No such lease",
    "quota_exceeded": "Quota exceeded",
    "usage_exceeded": "Usage quota exceeded",
    "override_refused": "Override refused",
    "request_already_decided": "Increase request already decided",
    "unknown_plan": "Unknown plan",
    "store_unavailable": "Storage unavailable",
    "ledger_unavailable": "Ledger unavailable",
    "not_ready": "Not ready",
    "internal_error": "Internal error",
}
INTERNAL = "the server could not answer this request"
_MAX_RETRY_AFTER = 3600
"""A longer wait than this from the engine is a bug's or a misconfiguration's: clients
are told to come back within the hour rather than never."""
_HTTP_CODES = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}


# problems ---------------------------------------------------------------------------


class ProblemError(Exception):
    """An error answer; raised anywhere in a request, rendered in one place."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        body = {
            "type": f"urn:tenantguard:problem:{self.code}",
            "title": _TITLES.get(self.code) or HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }
        headers = dict(self.headers or {})
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(body, status_code=self.status, headers=headers, media_type=PROBLEM)


def invalid(field: str, message: str) -> ProblemError:
    return ProblemError(
        422, "invalid_request", f"{field}: {message}", errors=[{"field": field, "message": message}]
    )


def translate(error: Exception) -> ProblemError | None:
    """The problem a guard exception stands for; ``None`` for one that is a bug."""
    if isinstance(error, ProblemError):
        return error
    if isinstance(error, QuotaExceeded):
        return ProblemError(
            error.status, error.code, str(error),
            tenant=error.tenant, quota=error.quota, limit=error.limit, used=error.used,
            requested=error.requested, plan=error.plan, resets_at=error.resets_at,
            advice=error.advice,
        )  # fmt: skip
    table: tuple[tuple[type[Exception], int, str], ...] = (
        (OverrideRefused, 409, "override_refused"),
        (RequestConflict, 409, "request_already_decided"),
        (UnknownPlanError, 422, "unknown_plan"),
        (UnknownQuotaError, 404, "quota_not_found"),
        (UnknownLimitError, 404, "limit_not_found"),
        (UnknownRequestError, 404, "request_not_found"),
        (UnknownLeaseError, 404, "lease_not_found"),
        (ValueError, 422, "invalid_request"),
    )
    for kind, status, code in table:
        if isinstance(error, kind):
            return ProblemError(status, code, str(error))
    if isinstance(error, LedgerUnavailable):
        wait = retry_seconds(error.retry_after)
        return ProblemError(
            503, "ledger_unavailable",
            f"the ledger cannot be reached; try again in {wait} s",
            headers={"Retry-After": str(wait)}, retry_after=wait,
        )  # fmt: skip
    if isinstance(error, StoreError):
        return ProblemError(
            503, "store_unavailable", "the ledger could not answer; try again",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    return None


def retry_seconds(seconds: object) -> int:
    """``Retry-After`` in whole seconds, at least 1: HTTP has no fractions, and 0 would
    invite a retry storm against a ledger that is already down. Anything that is not a
    finite number (the attribute is the engine's to set) counts as 1."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return 1
    if not math.isfinite(seconds):
        return 1 if seconds != math.inf else _MAX_RETRY_AFTER
    return max(1, min(math.ceil(seconds), _MAX_RETRY_AFTER))


def _field(loc: tuple[int | str, ...]) -> str:
    """``("body", "tenant")`` → ``tenant``; ``("query", "limit")`` → ``limit``."""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(part) for part in parts) or str(loc[0] if loc else "body")


async def validation_problem(request: Request, error: Exception) -> Response:
    if not isinstance(error, RequestValidationError):  # registered for this type only
        return await internal_problem(request, error)
    problems = list(error.errors())
    for problem in problems:
        if problem.get("type") == "json_invalid":  # only if FastAPI parsed it itself
            return ProblemError(400, "malformed_json", "the body is not valid JSON").response()
        if problem.get("type") == "missing" and tuple(problem.get("loc", ())) == ("body",):
            detail = "the body is empty: send a JSON object"
            return ProblemError(400, "malformed_json", detail).response()
    return invalid_fields(problems).response()


def invalid_fields(problems: Iterable[Mapping[str, Any]]) -> ProblemError:
    """The 422 for pydantic's errors, located as FastAPI locates them (``("body",
    "tenant")``, ``("query", "limit")``): every offending field, named."""
    errors = [
        {"field": _field(tuple(problem.get("loc", ()))), "message": str(problem.get("msg"))}
        for problem in problems
    ]
    detail = "; ".join(f"{item['field']}: {item['message']}" for item in errors)
    return ProblemError(422, "invalid_request", detail, errors=errors)


async def http_problem(request: Request, error: Exception) -> Response:
    if not isinstance(error, HTTPException):  # registered for this type only
        return await internal_problem(request, error)
    status = error.status_code
    code = _HTTP_CODES.get(status, "http_error")
    detail = f"{request.method} {request.url.path}"
    if status == 400:
        detail = "the body could not be parsed"
    elif status == 404:
        detail = f"no route {detail}"
    elif status == 405:
        detail = f"method not allowed: {detail}"
    headers = dict(error.headers) if error.headers else None
    return ProblemError(status, code, detail, headers=headers).response()


async def internal_problem(request: Request, error: Exception) -> Response:
    if isinstance(error, ProblemError):
        return error.response()
    log.error("unexpected error on %s %r", request.method, request.url.path, exc_info=error)
    return ProblemError(500, "internal_error", INTERNAL).response()
