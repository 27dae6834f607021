"""What a request to the HTTP service goes through before its endpoint runs.

``SegmentPaths`` routes on the raw path; ``Route`` checks the bearer token for the
route's role, *then* reads the body (at most ``MAX_BODY_BYTES`` of it, however it is
sent) and parses it as JSON, so nothing of an unauthenticated request is read; path
parameters are URL-decoded and checked by the dependencies at the end.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import quote_from_bytes, unquote, unquote_to_bytes

from fastapi import Depends, Path
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import AfterValidator, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantguard._api_models import MAX_ID_LENGTH, check_text
from tenantguard._api_problems import INTERNAL, ProblemError, invalid, log, translate
from tenantguard.guard import Guard

if TYPE_CHECKING:
    from tenantguard._metrics import WorkerMetrics

__all__ = [
    "MAX_BODY_BYTES",
    "AdminRoute",
    "GuardDep",
    "Lease",
    "LimitName",
    "QueryText",
    "QuotaName",
    "RequestId",
    "Role",
    "Route",
    "SegmentPaths",
    "ServiceRoute",
    "ServiceState",
    "TenantId",
    "Tokens",
    "digest",
    "json_object",
    "receive_body",
    "service_state",
]

MAX_BODY_BYTES = 64 * 1024

Role = Literal["service", "admin"]


# auth -------------------------------------------------------------------------------


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Tokens:
    """The tokens, kept only as SHA-256 digests and compared in constant time."""

    service: bytes
    admin: bytes

    def authorise(self, request: Request, role: Role) -> None:
        self.authorise_header(request.headers.get("authorization", ""), role)

    def authorise_header(self, authorization: str, role: Role) -> None:
        """The check itself, on the header's value: the lean ``/v1/check`` has no
        ``Request`` to hand."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ProblemError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
        given = digest(token)
        # both compared every time, so timing says nothing about which one matched
        is_admin = hmac.compare_digest(given, self.admin)
        is_service = hmac.compare_digest(given, self.service)
        if is_admin or (is_service and role == "service"):
            return
        if is_service:
            raise ProblemError(403, "forbidden", "this route needs the admin token")
        raise ProblemError(401, "unauthorized", "the bearer token is not valid for this route")

    def admits(self, authorization: str, role: Role) -> bool:
        """Whether the header's token may act as ``role``, for an open route that shows
        more to a token holder (``/readyz``) and refuses no one."""
        try:
            self.authorise_header(authorization, role)
        except ProblemError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class ServiceState:
    guard: Guard
    tokens: Tokens
    metrics: WorkerMetrics | None = None
    """Set when this process is one of several workers: ``/metrics`` then sums them all."""


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.tenantguard
    return state


def _guard(request: Request) -> Guard:
    return service_state(request).guard


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


class SegmentPaths:
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
        raise invalid(field, "must be UTF-8 when URL-decoded") from None
    if not text:
        raise invalid(field, "must not be empty")
    if len(text) > MAX_ID_LENGTH:
        raise invalid(field, f"must be at most {MAX_ID_LENGTH} characters")
    try:
        return check_text(text)
    except ValueError as error:
        raise invalid(field, str(error)) from None


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
QueryText = Annotated[str, Field(max_length=MAX_ID_LENGTH), AfterValidator(check_text)]


# bodies -----------------------------------------------------------------------------


def _too_large() -> ProblemError:
    return ProblemError(
        413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes"
    )


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it exceeds the bound rather than after buffering it."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_body(receive: Receive, declared: bytes) -> bytes:
    """``_read_body`` on the bare ASGI messages, for the lean ``/v1/check``: the same
    bound, checked on ``Content-Length`` (``declared``, b"" if none) and again on every
    chunk. A client that hangs up is ``ClientDisconnect``, as from ``Request.stream``."""
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnect
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: one message holds it all
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
        return body
    chunks = [body]
    size = len(body)
    while True:
        if size > MAX_BODY_BYTES:
            raise _too_large()
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    if size > MAX_BODY_BYTES:
        raise _too_large()
    return b"".join(chunks)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def json_object(body: bytes) -> dict[str, Any]:
    """A non-empty body as the JSON object it must be, or the problem saying why not."""
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError, bad UTF-8 and integers too long to convert
        detail = f"the body is not valid JSON: {error}"
        raise ProblemError(400, "malformed_json", detail) from None
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object")
    return data


async def _json_request(request: Request) -> Request:
    """Read and check the body, then hand FastAPI a request that replays it as JSON
    (whatever ``Content-Type`` said: the API speaks nothing else)."""
    body = await _read_body(request)
    if body:
        json_object(body)
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


class Route(APIRoute):
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
                    service_state(request).tokens.authorise(request, role)
                if reads_body:
                    request = await _json_request(request)
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise  # the app's handlers render these
            except Exception as error:
                problem = translate(error)
                if problem is None:
                    log.error("unexpected error on %s %s", request.method, where, exc_info=error)
                    problem = ProblemError(500, "internal_error", INTERNAL)
                return problem.response()

        return guarded


class ServiceRoute(Route):
    role = "service"


class AdminRoute(Route):
    role = "admin"
