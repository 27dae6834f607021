"""The HTTP decision and admin service (DESIGN.md, "HTTP API v1"), on FastAPI.

``create_app`` takes a ready ``Guard`` and the tokens, so that everything read from the
environment is read once, in ``tenantguard.cli``. The OpenAPI document at
``/openapi.json`` describes every route, body and answer.

What every request goes through, in order:

1. ``_SegmentPaths`` routes on the raw path, one segment at a time, so an id may hold
   any character URL-encoded, ``%2F`` included, without reaching another route;
2. the route's class (``_Route``) checks the bearer token for the route's role, *then*
   reads the body, at most ``MAX_BODY_BYTES`` of it however it is sent, and parses it as
   JSON: nothing of an unauthenticated request is read or parsed;
3. FastAPI validates the body against the route's (strict, closed) model;
4. the endpoint calls the guard, whose exceptions become problems in one table
   (``_translate``).

Every error is ``application/problem+json`` with a stable ``code`` a client can switch
on; bad input is always a 4xx that names what was wrong, never a 5xx. Anything else is
logged and answered 500 ``internal_error`` without details. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote_from_bytes, unquote, unquote_to_bytes

from fastapi import Depends, FastAPI, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantguard import __version__
from tenantguard._api_models import (
    MAX_ID_LENGTH,
    MAX_INSTANT,
    ApproveBody,
    CheckBody,
    CheckResult,
    EventList,
    EventOut,
    Health,
    IncreaseBody,
    IncreaseList,
    IncreaseOut,
    LimitsOut,
    OverrideBody,
    OverrideOut,
    Problem,
    QuotaChangeBody,
    Readiness,
    RejectBody,
    TenantBody,
    TenantDetail,
    TenantList,
    TenantOut,
    UsageBody,
    UsageOut,
    check_text,
)
from tenantguard.errors import StoreError, UnknownLeaseError
from tenantguard.guard import Guard
from tenantguard.increases import RequestConflict, UnknownRequestError
from tenantguard.ledger import EventRecord, IncreaseRequest, OverrideRecord, TenantRecord
from tenantguard.overrides import OverrideRefused, UnknownLimitError
from tenantguard.quotas import QuotaExceeded, UnknownQuotaError, Usage
from tenantguard.tenants import UnknownPlanError

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 64 * 1024
PING_TIMEOUT = 2.0
"""Seconds ``/readyz`` waits for each store before calling it down."""

_log = logging.getLogger(__name__)
_PROBLEM = "application/problem+json"
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
    "not_ready": "Not ready",
    "internal_error": "Internal error",
}
_INTERNAL = "the server could not answer this request"
_HTTP_CODES = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}

Role = Literal["service", "admin"]


# problems ---------------------------------------------------------------------------


class _ProblemError(Exception):
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
        return JSONResponse(body, status_code=self.status, headers=headers, media_type=_PROBLEM)


def _invalid(field: str, message: str) -> _ProblemError:
    return _ProblemError(
        422, "invalid_request", f"{field}: {message}", errors=[{"field": field, "message": message}]
    )


def _translate(error: Exception) -> _ProblemError | None:
    """The problem a guard exception stands for; ``None`` for one that is a bug."""
    if isinstance(error, _ProblemError):
        return error
    if isinstance(error, QuotaExceeded):
        return _ProblemError(
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
            return _ProblemError(status, code, str(error))
    if isinstance(error, StoreError):
        return _ProblemError(
            503, "store_unavailable", "the ledger could not answer; try again",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    return None


def _field(loc: tuple[int | str, ...]) -> str:
    """``("body", "tenant")`` → ``tenant``; ``("query", "limit")`` → ``limit``."""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(part) for part in parts) or str(loc[0] if loc else "body")


async def _validation_problem(request: Request, error: Exception) -> Response:
    if not isinstance(error, RequestValidationError):  # registered for this type only
        return await _internal_problem(request, error)
    problems = list(error.errors())
    for problem in problems:
        if problem.get("type") == "json_invalid":  # only if FastAPI parsed it itself
            return _ProblemError(400, "malformed_json", "the body is not valid JSON").response()
        if problem.get("type") == "missing" and tuple(problem.get("loc", ())) == ("body",):
            detail = "the body is empty: send a JSON object"
            return _ProblemError(400, "malformed_json", detail).response()
    errors = [
        {"field": _field(tuple(problem.get("loc", ()))), "message": str(problem.get("msg"))}
        for problem in problems
    ]
    detail = "; ".join(f"{item['field']}: {item['message']}" for item in errors)
    return _ProblemError(422, "invalid_request", detail, errors=errors).response()


async def _http_problem(request: Request, error: Exception) -> Response:
    if not isinstance(error, HTTPException):  # registered for this type only
        return await _internal_problem(request, error)
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
    return _ProblemError(status, code, detail, headers=headers).response()


async def _internal_problem(request: Request, error: Exception) -> Response:
    if isinstance(error, _ProblemError):
        return error.response()
    _log.error("unexpected error on %s %r", request.method, request.url.path, exc_info=error)
    return _ProblemError(500, "internal_error", _INTERNAL).response()


# auth -------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class _Tokens:
    """The tokens, kept only as SHA-256 digests and compared in constant time."""

    service: bytes
    admin: bytes

    def authorise(self, request: Request, role: Role) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _ProblemError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
        given = _digest(token)
        # both compared every time, so timing says nothing about which one matched
        is_admin = hmac.compare_digest(given, self.admin)
        is_service = hmac.compare_digest(given, self.service)
        if is_admin or (is_service and role == "service"):
            return
        if is_service:
            raise _ProblemError(403, "forbidden", "this route needs the admin token")
        raise _ProblemError(401, "unauthorized", "the bearer token is not valid for this route")


@dataclass(frozen=True, slots=True)
class _State:
    guard: Guard
    tokens: _Tokens


def _state(request: Request) -> _State:
    state: _State = request.app.state.tenantguard
    return state


def _guard(request: Request) -> Guard:
    return _state(request).guard


GuardDep = Annotated[Guard, Depends(_guard)]


# paths ------------------------------------------------------------------------------


def _escape(segment: bytes) -> str:
    """One raw path segment as the router sees it: decoded, with only ``%`` and ``/``
    escaped, so it never splits and ``_unescape`` gives back exactly what was sent.
    A segment that is not UTF-8 stays fully escaped, for ``_unescape`` to refuse."""
    data = unquote_to_bytes(segment)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return quote_from_bytes(data, safe="")
    return text.replace("%", "%25").replace("/", "%2F")


class _SegmentPaths:
    """Route on the raw path (``%2F`` inside an id stays inside it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path")
            if isinstance(raw, bytes):
                segments = raw.split(b"?", 1)[0].split(b"/")
            else:
                segments = [part.encode() for part in scope["path"].split("/")]
            scope = {**scope, "path": "/".join(_escape(part) for part in segments)}
        await self.app(scope, receive, send)


def _unescape(value: str, field: str) -> str:
    try:
        text = unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise _invalid(field, "must be UTF-8 when URL-decoded") from None
    if not text:
        raise _invalid(field, "must not be empty")
    if len(text) > MAX_ID_LENGTH:
        raise _invalid(field, f"must be at most {MAX_ID_LENGTH} characters")
    try:
        return check_text(text)
    except ValueError as error:
        raise _invalid(field, str(error)) from None


_ID_DOC = f"Any characters, URL-encoded (`%2F` for `/`); at most {MAX_ID_LENGTH} once decoded."


def _tenant(tenant: Annotated[str, Path(description=f"Tenant id. {_ID_DOC}")]) -> str:
    return _unescape(tenant, "tenant")


def _limit_name(name: Annotated[str, Path(description="Rate limit or quota name.")]) -> str:
    return _unescape(name, "name")


def _quota(quota: Annotated[str, Path(description="Quota name.")]) -> str:
    return _unescape(quota, "quota")


def _request_id(request_id: Annotated[str, Path(description="Increase request id.")]) -> str:
    return _unescape(request_id, "request_id")


def _lease(lease: Annotated[str, Path(description="Lease from a decision.")]) -> str:
    return _unescape(lease, "lease")


TenantId = Annotated[str, Depends(_tenant)]
LimitName = Annotated[str, Depends(_limit_name)]
QuotaName = Annotated[str, Depends(_quota)]
RequestId = Annotated[str, Depends(_request_id)]
Lease = Annotated[str, Depends(_lease)]
_QueryText = Annotated[str, AfterValidator(check_text), Field(max_length=MAX_ID_LENGTH)]


# bodies -----------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it exceeds the bound rather than after buffering it."""
    too_large = _ProblemError(
        413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


async def _json_request(request: Request) -> Request:
    """Read and check the body, then hand FastAPI a request that replays it as JSON
    (whatever ``Content-Type`` said: the API speaks nothing else)."""
    body = await _read_body(request)
    if body:
        try:
            data = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError) as error:
            # ValueError covers JSONDecodeError, bad UTF-8 and integers too long to convert
            detail = f"the body is not valid JSON: {error}"
            raise _ProblemError(400, "malformed_json", detail) from None
        if not isinstance(data, dict):
            raise _invalid("body", "must be a JSON object")
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    upstream = request.receive
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await upstream()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({**request.scope, "headers": headers}, replay)


class _Route(APIRoute):
    """Auth for the route's ``role``, then the bounded body, then FastAPI; guard errors
    become problems here, so nothing a client sends can escape as a 500."""

    role: ClassVar[Role | None] = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        role = self.role
        reads_body = self.body_field is not None
        where = self.path

        async def guarded(request: Request) -> Response:
            try:
                if role is not None:
                    _state(request).tokens.authorise(request, role)
                if reads_body:
                    request = await _json_request(request)
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise  # the app's handlers render these
            except Exception as error:
                problem = _translate(error)
                if problem is None:
                    _log.error("unexpected error on %s %s", request.method, where, exc_info=error)
                    problem = _ProblemError(500, "internal_error", _INTERNAL)
                return problem.response()

        return guarded


class _ServiceRoute(_Route):
    role = "service"


class _AdminRoute(_Route):
    role = "admin"


_open = APIRouter(route_class=_Route, tags=["operations"])
_service = APIRouter(route_class=_ServiceRoute, tags=["decisions"])
_admin = APIRouter(route_class=_AdminRoute, tags=["admin"])


def _problems(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": Problem, "description": text} for status, text in codes}


_TENANT_404 = (404, "`tenant_not_found`: no record for this tenant.")
_STORE_503 = (503, "`store_unavailable`: the ledger could not answer.")


# shapes -----------------------------------------------------------------------------


def _tenant_out(record: TenantRecord) -> TenantOut:
    return TenantOut(
        tenant=record.tenant, plan=record.plan, metadata=dict(record.metadata),
        created_at=record.created_at, updated_at=record.updated_at,
    )  # fmt: skip


def _override_out(record: OverrideRecord) -> OverrideOut:
    return OverrideOut(
        tenant=record.tenant, name=record.name, value=record.value,
        multiplier=record.multiplier, reason=record.reason, expires_at=record.expires_at,
        created_by=record.created_by, created_at=record.created_at,
    )  # fmt: skip


def _usage_out(usage: Usage) -> UsageOut:
    return UsageOut(
        quota=usage.quota, scope=usage.scope, used=usage.used, limit=usage.limit,
        remaining=usage.remaining, period=usage.period, resets_at=usage.resets_at,
        source=usage.source,
    )  # fmt: skip


def _request_out(request: IncreaseRequest) -> IncreaseOut:
    return IncreaseOut(
        id=request.id, tenant=request.tenant, limit=request.limit,
        requested=request.requested, reason=request.reason,
        status=request.status,
        avg_rps=request.avg_rps, peak_rps=request.peak_rps,
        burst_pattern=request.burst_pattern, endpoints=list(request.endpoints),
        needed_by=request.needed_by, created_at=request.created_at,
        decided_at=request.decided_at, decided_by=request.decided_by,
        decision_reason=request.decision_reason, approved_value=request.approved_value,
        approved_expires_at=request.approved_expires_at,
    )  # fmt: skip


def _event_out(event: EventRecord) -> EventOut:
    return EventOut(
        id=event.id, tenant=event.tenant, kind=event.kind, name=event.name, at=event.at,
        data=dict(event.data),
    )  # fmt: skip


# decisions --------------------------------------------------------------------------


@_service.post(
    "/v1/check",
    response_model=None,
    responses={200: {"model": CheckResult, "description": "The decision."}},
    summary="Decide whether a request may proceed, and count it",
)
async def check(body: CheckBody, guard: GuardDep) -> Response:
    decision = await guard.check(
        body.tenant,
        body.method.upper(),
        body.path,
        client=body.client,
        ip=body.ip,
        user=body.user,
        headers=body.headers,
        cost=body.cost,
    )
    return JSONResponse(decision.as_dict())


@_service.post(
    "/v1/leases/{lease}/release",
    status_code=204,
    response_class=Response,
    responses=_problems((404, "`lease_not_found`: not a lease tenantguard issued.")),
    summary="End a concurrency lease (repeats are no-ops)",
)
async def release_lease(lease: Lease, guard: GuardDep) -> Response:
    try:
        await guard.release(lease)
    except RecursionError:  # a forged token nested past what JSON can parse
        raise _ProblemError(404, "lease_not_found", "not a lease issued by tenantguard") from None
    return Response(status_code=204)


# tenants ----------------------------------------------------------------------------


@_admin.get("/v1/tenants", summary="List tenants, by id")
async def list_tenants(
    guard: GuardDep,
    prefix: Annotated[_QueryText, Query(description="Only ids starting with this.")] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TenantList:
    records = await guard.tenants.list(prefix=prefix, limit=limit)
    return TenantList(tenants=[_tenant_out(record) for record in records])


@_admin.put(
    "/v1/tenants/{tenant}",
    responses=_problems((422, "`unknown_plan` or `invalid_request`."), _STORE_503),
    summary="Create a tenant or change its plan or metadata",
)
async def put_tenant(tenant: TenantId, body: TenantBody, guard: GuardDep) -> TenantOut:
    record = await guard.tenants.upsert(tenant, plan=body.plan, metadata=body.metadata)
    return _tenant_out(record)


@_admin.get(
    "/v1/tenants/{tenant}",
    responses=_problems(_TENANT_404),
    summary="A tenant's plan, metadata and overrides",
)
async def get_tenant(tenant: TenantId, guard: GuardDep) -> TenantDetail:
    record = await guard.tenants.get(tenant)
    if record is None:
        raise _ProblemError(404, "tenant_not_found", f"no tenant {tenant!r}")
    overrides = await guard.overrides.list(tenant)
    return TenantDetail(
        **_tenant_out(record).model_dump(), overrides=[_override_out(o) for o in overrides]
    )


@_admin.delete(
    "/v1/tenants/{tenant}",
    status_code=204,
    response_class=Response,
    responses=_problems(_TENANT_404),
    summary="Forget a tenant's record (counts, overrides and history are kept)",
)
async def delete_tenant(tenant: TenantId, guard: GuardDep) -> Response:
    if not await guard.tenants.delete(tenant):
        raise _ProblemError(404, "tenant_not_found", f"no tenant {tenant!r}")
    return Response(status_code=204)


@_admin.get(
    "/v1/tenants/{tenant}/limits",
    summary="Every effective rate limit, quota and entitlement, with current usage",
)
async def get_limits(tenant: TenantId, guard: GuardDep) -> LimitsOut:
    return LimitsOut.model_validate(await guard.limits(tenant))


@_admin.put(
    "/v1/tenants/{tenant}/overrides/{name}",
    responses=_problems(
        (404, "`limit_not_found`: no rate limit or quota of that name."),
        (409, "`override_refused`: a hard plan's limits cannot be raised."),
    ),
    summary="Raise or lower one rule or quota for one tenant",
)
async def put_override(
    tenant: TenantId, name: LimitName, body: OverrideBody, guard: GuardDep
) -> OverrideOut:
    record = await guard.overrides.set(
        tenant, name, value=body.value, multiplier=body.multiplier, reason=body.reason,
        expires_at=body.expires_at,
    )  # fmt: skip
    return _override_out(record)


@_admin.delete(
    "/v1/tenants/{tenant}/overrides/{name}",
    status_code=204,
    response_class=Response,
    responses=_problems((404, "`override_not_found`.")),
    summary="Remove an override: the plan's value applies again",
)
async def delete_override(tenant: TenantId, name: LimitName, guard: GuardDep) -> Response:
    if not await guard.overrides.remove(tenant, name):
        raise _ProblemError(
            404, "override_not_found", f"tenant {tenant!r} has no override {name!r}"
        )
    return Response(status_code=204)


# quotas -----------------------------------------------------------------------------

_QUOTA_ERRORS = _problems(
    (403, "`quota_exceeded`: over an entity cap; nothing was counted."),
    (404, "`quota_not_found`."),
    (429, "`usage_exceeded`: over a usage quota for this period; nothing was counted."),
    _STORE_503,
)


@_service.post(
    "/v1/tenants/{tenant}/quotas/{quota}/acquire",
    responses=_QUOTA_ERRORS,
    summary="Take from a quota (and everything it counts toward), all or nothing",
)
async def acquire(
    tenant: TenantId, quota: QuotaName, guard: GuardDep, body: QuotaChangeBody | None = None
) -> UsageOut:
    change = body or QuotaChangeBody()
    usage = await guard.quotas.acquire(
        tenant, quota, change.amount, scope=change.scope, idempotency_key=change.idempotency_key
    )
    return _usage_out(usage)


@_service.post(
    "/v1/tenants/{tenant}/quotas/{quota}/release",
    responses=_problems((404, "`quota_not_found`."), _STORE_503),
    summary="Give back to a quota (never below zero)",
)
async def release(
    tenant: TenantId, quota: QuotaName, guard: GuardDep, body: QuotaChangeBody | None = None
) -> UsageOut:
    change = body or QuotaChangeBody()
    usage = await guard.quotas.release(
        tenant, quota, change.amount, scope=change.scope, idempotency_key=change.idempotency_key
    )
    return _usage_out(usage)


@_admin.get(
    "/v1/tenants/{tenant}/quotas/{quota}/usage",
    responses=_problems((404, "`quota_not_found`.")),
    summary="A quota's current count",
)
async def get_usage(
    tenant: TenantId,
    quota: QuotaName,
    guard: GuardDep,
    scope: Annotated[_QueryText | None, Query(description="For a quota counted per scope.")] = None,
) -> UsageOut:
    return _usage_out(await guard.quotas.get(tenant, quota, scope=scope))


@_admin.put(
    "/v1/tenants/{tenant}/quotas/{quota}/usage",
    responses=_problems((404, "`quota_not_found`."), _STORE_503),
    summary="Reconcile a quota's count with the source of truth",
)
async def put_usage(
    tenant: TenantId, quota: QuotaName, body: UsageBody, guard: GuardDep
) -> UsageOut:
    return _usage_out(await guard.quotas.set_usage(tenant, quota, body.used, scope=body.scope))


# increase requests ------------------------------------------------------------------


@_service.post(
    "/v1/tenants/{tenant}/increase-requests",
    status_code=201,
    responses=_problems((404, "`limit_not_found`."), _STORE_503),
    summary="Ask for more of one limit (rejected at once on a hard plan)",
)
async def file_request(tenant: TenantId, body: IncreaseBody, guard: GuardDep) -> IncreaseOut:
    request = await guard.increase_requests.file(
        tenant, limit=body.limit, requested=body.requested, reason=body.reason,
        avg_rps=body.avg_rps, peak_rps=body.peak_rps, burst_pattern=body.burst_pattern,
        endpoints=body.endpoints, needed_by=body.needed_by,
    )  # fmt: skip
    return _request_out(request)


@_admin.get("/v1/increase-requests", summary="List increase requests, newest first")
async def list_requests(
    guard: GuardDep,
    status: Annotated[Literal["pending", "approved", "rejected"] | None, Query()] = None,
    tenant: Annotated[_QueryText | None, Query()] = None,
) -> IncreaseList:
    requests = await guard.increase_requests.list(status=status, tenant=tenant)
    return IncreaseList(requests=[_request_out(request) for request in requests])


@_admin.get(
    "/v1/increase-requests/{request_id}",
    responses=_problems((404, "`request_not_found`.")),
    summary="One increase request",
)
async def get_request(request_id: RequestId, guard: GuardDep) -> IncreaseOut:
    return _request_out(await guard.increase_requests.get(request_id))


_DECIDE_ERRORS = _problems(
    (404, "`request_not_found`."),
    (409, "`request_already_decided`, or `override_refused` if the plan became hard."),
    _STORE_503,
)


@_admin.post(
    "/v1/increase-requests/{request_id}/approve",
    responses=_DECIDE_ERRORS,
    summary="Approve: creates the override",
)
async def approve(
    request_id: RequestId, guard: GuardDep, body: ApproveBody | None = None
) -> IncreaseOut:
    decision = body or ApproveBody()
    request = await guard.increase_requests.approve(
        request_id, value=decision.value, expires_at=decision.expires_at, reason=decision.reason
    )
    return _request_out(request)


@_admin.post(
    "/v1/increase-requests/{request_id}/reject",
    responses=_DECIDE_ERRORS,
    summary="Reject, saying why",
)
async def reject(request_id: RequestId, body: RejectBody, guard: GuardDep) -> IncreaseOut:
    return _request_out(await guard.increase_requests.reject(request_id, reason=body.reason))


# events -----------------------------------------------------------------------------

EventKind = Literal[
    "warning", "violation", "quota_exceeded", "override_set", "override_removed",
    "plan_changed", "increase_requested", "increase_decided",
]  # fmt: skip


@_admin.get(
    "/v1/tenants/{tenant}/events",
    responses=_problems(_STORE_503),
    summary="A tenant's warnings, violations and changes, newest first",
)
async def list_events(
    tenant: TenantId,
    guard: GuardDep,
    since: Annotated[
        float | None, Query(ge=0, le=MAX_INSTANT, description="Epoch seconds, inclusive.")
    ] = None,
    kind: Annotated[list[EventKind] | None, Query(description="Repeat to allow several.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    await guard.events.flush()  # what this replica noticed so far is in the answer
    events = await guard.ledger.events(tenant, since=since, kinds=kind, limit=limit)
    return EventList(events=[_event_out(event) for event in events])


# operations -------------------------------------------------------------------------


@_open.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@_open.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


async def _ping(ping: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return bool(await asyncio.wait_for(ping(), PING_TIMEOUT))
    except Exception:  # a probe reports, it never fails
        return False


def _counter_store(guard: Guard) -> object:
    return guard.counters


@_open.get(
    "/readyz",
    responses=_problems((503, "`not_ready`: says which store is down.")),
    summary="Readiness: the ledger and the counter store answer, the policy loaded",
)
async def readyz(guard: GuardDep) -> Readiness:
    checks = {"ledger": "ok" if await _ping(guard.ledger.ping) else "down"}
    ping = getattr(_counter_store(guard), "ping", None)
    if callable(ping):
        checks["counters"] = "ok" if await _ping(ping) else "down"
    policy = guard.policy.source
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        detail = "; ".join(f"{name} {checks[name]}" for name in down)
        raise _ProblemError(503, "not_ready", detail, policy=policy, checks=checks)
    return Readiness(status="ready", policy=policy, reload_error=guard.reload_error)


# the app ----------------------------------------------------------------------------


class _App(FastAPI):
    """FastAPI, with an OpenAPI document that says what the routes really answer:
    errors as problem+json, and which bearer token each route takes."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title, version=self.version, description=self.description,
                routes=self.routes,
            )  # fmt: skip
            _document(schema, self.routes)
            self.openapi_schema = schema
        return self.openapi_schema


_ROLE_DOC = {
    "service": "Bearer token: the service token (the admin token is accepted too).",
    "admin": "Bearer token: the admin token.",
}


def _document(schema: dict[str, Any], routes: list[Any]) -> None:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    ref = {"$ref": "#/components/schemas/Problem"}
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        role = getattr(route, "role", None)
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses: dict[str, Any] = operation["responses"]
            if route.body_field is not None:
                responses.setdefault("400", {"description": "`malformed_json`."})
                responses.setdefault("413", {"description": "`body_too_large`: over 64 KiB."})
            if "422" in responses or route.body_field is not None or route.dependant.path_params:
                responses["422"] = {"description": "`invalid_request`: names each field."}
            if role is not None:
                operation["security"] = [{"bearer": []}]
                operation["description"] = _ROLE_DOC[role]
                responses.setdefault("401", {"description": "`unauthorized`."})
            if role == "admin":
                responses.setdefault("403", {"description": "`forbidden`: not the admin token."})
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = {_PROBLEM: {"schema": ref}}


def create_app(guard: Guard, *, service_token: str, admin_token: str) -> FastAPI:
    """The service. Decision routes take the service or the admin token; admin routes
    take the admin token only. The app's lifespan closes ``guard`` at shutdown."""
    if not service_token or not admin_token:
        raise ValueError("service_token and admin_token must be non-empty")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await guard.close()

    app = _App(
        title="tenantguard",
        version=__version__,
        description="Decisions and administration for the limits a multi-tenant API "
        "platform sells with its plans. Every error is `application/problem+json` "
        "with a stable `code`.",
        lifespan=lifespan,
        redirect_slashes=False,
        redoc_url=None,
    )
    app.state.tenantguard = _State(guard, _Tokens(_digest(service_token), _digest(admin_token)))
    # the routes themselves, not include_router: some FastAPI versions wrap included routers
    app.router.routes.extend([*_service.routes, *_admin.routes, *_open.routes])
    app.add_exception_handler(RequestValidationError, _validation_problem)
    app.add_exception_handler(HTTPException, _http_problem)
    app.add_exception_handler(_ProblemError, _internal_problem)
    app.add_exception_handler(Exception, _internal_problem)
    app.add_middleware(_SegmentPaths)
    return app
