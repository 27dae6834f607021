"""The HTTP decision and admin service (DESIGN.md, "HTTP API v1"), on FastAPI.

``create_app`` takes a ready ``Guard`` and the tokens, so that everything read from the
environment is read once, in ``tenantguard.cli``. The OpenAPI document at
``/openapi.json`` describes every route, body and answer.

What every request goes through, in order:

0. ``POST /v1/check``, the decision every proxied request waits for, goes straight to
   its bare ASGI endpoint (``_api_check``): the same auth, body bound, validation and
   problems as below, without FastAPI's middleware, dependency injection or pydantic
   (a FastAPI twin documents it in ``/openapi.json``). Middleware added to the app does
   not see it: wrap the app instead. Everything else:
1. ``SegmentPaths`` (``_api_requests``) routes on the raw path, one segment at a time,
   so an id may hold any character URL-encoded, ``%2F`` included, without reaching
   another route;
2. the route's class (``Route``) checks the bearer token for the route's role, *then*
   reads the body, at most ``MAX_BODY_BYTES`` of it however it is sent, and parses it as
   JSON: nothing of an unauthenticated request is read or parsed;
3. FastAPI validates the body against the route's (strict, closed) model;
4. the endpoint calls the guard, whose exceptions become problems in one table
   (``_api_problems.translate``).

Every error is ``application/problem+json`` with a stable ``code`` a client can switch
on; bad input is always a 4xx that names what was wrong, never a 5xx. A ledger that
cannot be reached is 503 ``ledger_unavailable`` with ``Retry-After`` on every route that
needs it; checks go on without it. Anything else is logged and answered 500
``internal_error`` without details. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as PlainRoute
from starlette.types import Receive, Scope, Send

from tenantguard import __version__
from tenantguard._api_check import CheckEndpoint, decide
from tenantguard._api_models import (
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
)
from tenantguard._api_openapi import DocumentedApp
from tenantguard._api_problems import (
    ProblemError,
    http_problem,
    internal_problem,
    validation_problem,
)
from tenantguard._api_readiness import readiness, start_tenant_state
from tenantguard._api_requests import (
    MAX_BODY_BYTES,
    AdminRoute,
    GuardDep,
    Lease,
    LimitName,
    QueryText,
    QuotaName,
    RequestId,
    Route,
    SegmentPaths,
    ServiceRoute,
    ServiceState,
    TenantId,
    Tokens,
    digest,
    service_state,
)
from tenantguard._metrics import WorkerMetrics
from tenantguard.guard import Guard
from tenantguard.ledger import EventRecord, IncreaseRequest, OverrideRecord, TenantRecord
from tenantguard.quotas import Usage

__all__ = ["MAX_BODY_BYTES", "create_app"]

_documented = APIRouter(route_class=ServiceRoute, tags=["decisions"])
_open = APIRouter(route_class=Route, tags=["operations"])
_service = APIRouter(route_class=ServiceRoute, tags=["decisions"])
_admin = APIRouter(route_class=AdminRoute, tags=["admin"])


def _problems(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": Problem, "description": text} for status, text in codes}


_TENANT_404 = (404, "`tenant_not_found`: no record for this tenant.")
_STORE_503 = (
    503,
    "`ledger_unavailable`: the ledger cannot be reached (`Retry-After` says when to "
    "try again; checks go on without it); `store_unavailable`: it could not answer.",
)


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


@_documented.post(
    "/v1/check",
    response_model=None,
    responses={200: {"model": CheckResult, "description": "The decision."}},
    summary="Decide whether a request may proceed, and count it",
)
async def check(body: CheckBody, guard: GuardDep) -> Response:
    # what CheckEndpoint serves, in FastAPI's terms: the document's entry for it, and the
    # reference the tests hold the lean endpoint to; never routed to (a docstring here
    # would become the operation's description)
    return JSONResponse((await decide(guard, body)).as_dict())


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
        raise ProblemError(404, "lease_not_found", "not a lease issued by tenantguard") from None
    return Response(status_code=204)


# tenants ----------------------------------------------------------------------------


@_admin.get("/v1/tenants", responses=_problems(_STORE_503), summary="List tenants, by id")
async def list_tenants(
    guard: GuardDep,
    prefix: Annotated[QueryText, Query(description="Only ids starting with this.")] = "",
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
    responses=_problems(_TENANT_404, _STORE_503),
    summary="A tenant's plan, metadata and overrides",
)
async def get_tenant(tenant: TenantId, guard: GuardDep) -> TenantDetail:
    record = await guard.tenants.get(tenant)
    if record is None:
        raise ProblemError(404, "tenant_not_found", f"no tenant {tenant!r}")
    overrides = await guard.overrides.list(tenant)
    return TenantDetail(
        **_tenant_out(record).model_dump(), overrides=[_override_out(o) for o in overrides]
    )


@_admin.delete(
    "/v1/tenants/{tenant}",
    status_code=204,
    response_class=Response,
    responses=_problems(_TENANT_404, _STORE_503),
    summary="Forget a tenant's record (counts, overrides and history are kept)",
)
async def delete_tenant(tenant: TenantId, guard: GuardDep) -> Response:
    if not await guard.tenants.delete(tenant):
        raise ProblemError(404, "tenant_not_found", f"no tenant {tenant!r}")
    return Response(status_code=204)


@_admin.get(
    "/v1/tenants/{tenant}/limits",
    responses=_problems(_STORE_503),
    summary="Every effective rate limit, quota and entitlement, with current usage",
)
async def get_limits(tenant: TenantId, guard: GuardDep) -> LimitsOut:
    return LimitsOut.model_validate(await guard.limits(tenant))


@_admin.put(
    "/v1/tenants/{tenant}/overrides/{name}",
    responses=_problems(
        (404, "`limit_not_found`: no rate limit or quota of that name."),
        (409, "`override_refused`: a hard plan's limits cannot be raised."),
        _STORE_503,
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
    responses=_problems((404, "`override_not_found`."), _STORE_503),
    summary="Remove an override: the plan's value applies again",
)
async def delete_override(tenant: TenantId, name: LimitName, guard: GuardDep) -> Response:
    if not await guard.overrides.remove(tenant, name):
        raise ProblemError(404, "override_not_found", f"tenant {tenant!r} has no override {name!r}")
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
    responses=_problems((404, "`quota_not_found`."), _STORE_503),
    summary="A quota's current count",
)
async def get_usage(
    tenant: TenantId,
    quota: QuotaName,
    guard: GuardDep,
    scope: Annotated[QueryText | None, Query(description="For a quota counted per scope.")] = None,
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


@_admin.get(
    "/v1/increase-requests",
    responses=_problems(_STORE_503),
    summary="List increase requests, newest first",
)
async def list_requests(
    guard: GuardDep,
    status: Annotated[Literal["pending", "approved", "rejected"] | None, Query()] = None,
    tenant: Annotated[QueryText | None, Query()] = None,
) -> IncreaseList:
    requests = await guard.increase_requests.list(status=status, tenant=tenant)
    return IncreaseList(requests=[_request_out(request) for request in requests])


@_admin.get(
    "/v1/increase-requests/{request_id}",
    responses=_problems((404, "`request_not_found`."), _STORE_503),
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
async def metrics(request: Request) -> Response:
    shared = service_state(request).metrics
    body = generate_latest() if shared is None else shared.exposition()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@_open.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@_open.get(
    "/readyz",
    responses=_problems((503, "`not_ready`: says what is down.")),
    response_model_exclude_unset=True,
    summary="Readiness: checks can be served, the policy loaded",
    description="200 while checks can be served, also while the ledger is down: checks then "
    "run on the tenant state held in memory. 503 `not_ready` when the counter store does "
    "not answer, or when the ledger is down and no tenant state was ever loaded. With the "
    "admin token the answer also shows `checks` (each store's ping) and `tenant_state`.",
)
async def readyz(request: Request) -> Readiness:
    return await readiness(service_state(request), request.headers.get("authorization", ""))


class _Service(DocumentedApp):
    """The service's app: ``POST /v1/check`` goes straight to its endpoint, before any
    of FastAPI's layers; the router has the same endpoint too, so other methods on the
    path and other spellings of it get the answers they always did."""

    check_endpoint: CheckEndpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            raw = scope.get("raw_path")
            if raw == b"/v1/check" or (
                raw.__class__ is bytes and raw.partition(b"?")[0] == b"/v1/check"
            ):
                await self.check_endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    guard: Guard,
    *,
    service_token: str,
    admin_token: str,
    metrics: WorkerMetrics | None = None,
) -> FastAPI:
    """The service. Decision routes take the service or the admin token; admin routes
    take the admin token only. The app's lifespan starts ``guard`` (its tenant state)
    before serving and closes it at shutdown. ``metrics`` is for a worker among several
    (``serve --workers``): its ``/metrics`` then sums them all."""
    if not service_token or not admin_token:
        raise ValueError("service_token and admin_token must be non-empty")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start_tenant_state(guard)
        publishing = None
        if metrics is not None:
            publishing = asyncio.get_running_loop().create_task(metrics.run())
        yield
        if publishing is not None:
            publishing.cancel()  # it publishes once more on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
        await guard.close()

    app = _Service(
        title="tenantguard",
        version=__version__,
        description="Decisions and administration for the limits a multi-tenant API "
        "platform sells with its plans. Every error is `application/problem+json` "
        "with a stable `code`.",
        lifespan=lifespan,
        redirect_slashes=False,
        redoc_url=None,
    )
    state = ServiceState(guard, Tokens(digest(service_token), digest(admin_token)), metrics)
    app.state.tenantguard = state
    app.check_endpoint = CheckEndpoint(state)
    app.documented = tuple(route for route in _documented.routes if isinstance(route, Route))
    check = PlainRoute("/v1/check", app.check_endpoint, methods=["POST"], include_in_schema=False)
    # the routes themselves, not include_router: some FastAPI versions wrap included routers
    app.router.routes.extend([check, *_service.routes, *_admin.routes, *_open.routes])
    answer_with_problems(app)
    return app


def answer_with_problems(app: FastAPI) -> None:
    """Every error as problem+json, and routing on the raw path: what any app serving
    these routes needs (``create_app``, and the tests' reference app)."""
    app.add_exception_handler(RequestValidationError, validation_problem)
    app.add_exception_handler(HTTPException, http_problem)
    app.add_exception_handler(ProblemError, internal_problem)
    app.add_exception_handler(Exception, internal_problem)
    app.add_middleware(SegmentPaths)
