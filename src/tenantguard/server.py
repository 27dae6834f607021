"""The HTTP decision service (DESIGN.md, "HTTP API v1"), as a Starlette app.

``create_app`` takes a ready ``Guard`` and the tokens, so that everything read from the
environment is read once, in ``tenantguard.cli``. Every error is problem+json with a
stable ``code`` a client can switch on; bad input is always a 4xx that names what was
wrong, never a 5xx.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tenantguard.guard import Guard

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 64 * 1024
_PROBLEM = "application/problem+json"
_TITLES = {
    "unauthorized": "Missing or invalid bearer token",
    "malformed_json": "Request body is not valid JSON",
    "invalid_request": "Request body is not valid",
    "body_too_large": "Request body too large",
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class CheckRequest(BaseModel):
    """The body of ``POST /v1/check``.

    Unknown fields are rejected so that a misspelt ``client`` or ``cost`` is an error
    rather than a silently different counter key or weight. ``cost`` is only type-checked
    here: ``Guard.check`` owns the rule for valid costs and its ``ValueError`` is a 422.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: StrictStr = Field(min_length=1)
    method: StrictStr = Field(pattern=r"^[A-Za-z]+$", max_length=32)
    path: StrictStr = Field(min_length=1)
    client: StrictStr | None = None
    ip: StrictStr | None = None
    user: StrictStr | None = None
    cost: StrictInt = 1


class _ProblemError(Exception):
    """An error answer; raised anywhere in a handler, rendered in one place."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
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
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers, media_type=_PROBLEM)


async def _render(request: Request, error: Exception) -> Response:
    if isinstance(error, HTTPException):
        code = _HTTP_CODES.get(error.status_code, "http_error")
        error = _ProblemError(error.status_code, code, f"{request.method} {request.url.path}")
    elif not isinstance(error, _ProblemError):
        error = _ProblemError(500, "internal_error", "the server could not answer this request")
    return error.response()


def _bearer(request: Request) -> bytes | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode()


def _authorise(request: Request, tokens: tuple[bytes, ...]) -> None:
    """Every token is compared, in constant time, so timing says nothing about which."""
    given = _bearer(request)
    if given is None:
        raise _ProblemError(401, "unauthorized", "send 'Authorization: Bearer <token>'")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    if not matched:
        raise _ProblemError(401, "unauthorized", "the bearer token is not valid for this route")


async def _read_body(request: Request) -> bytes:
    """The body, refused as soon as it exceeds the bound rather than after buffering it."""
    too_large = _ProblemError(
        413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> CheckRequest:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError, bad UTF-8 and integers too long to convert
        raise _ProblemError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise _ProblemError(422, "invalid_request", "the body must be a JSON object")
    try:
        return CheckRequest.model_validate(data)
    except ValidationError as error:
        errors = [
            {
                "field": ".".join(str(part) for part in problem["loc"]),
                "message": problem["msg"],
            }
            for problem in error.errors(include_url=False)
        ]
        detail = "; ".join(f"{item['field']}: {item['message']}" for item in errors)
        raise _ProblemError(422, "invalid_request", detail, errors=errors) from None


def create_app(guard: Guard, *, service_token: str, admin_token: str) -> Starlette:
    """The service; decision routes accept the service or the admin token."""
    if not service_token or not admin_token:
        raise ValueError("service_token and admin_token must be non-empty")
    service_tokens = (service_token.encode(), admin_token.encode())

    async def check(request: Request) -> Response:
        _authorise(request, service_tokens)
        body = _parse(await _read_body(request))
        try:
            decision = await guard.check(
                body.tenant,
                body.method.upper(),
                body.path,
                client=body.client,
                ip=body.ip,
                user=body.user,
                cost=body.cost,
            )
        except ValueError as error:
            raise _ProblemError(422, "invalid_request", str(error)) from None
        return JSONResponse(decision.as_dict())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        return JSONResponse({"status": "ready", "policy": guard.policy.source})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await guard.close()

    return Starlette(
        routes=[
            Route("/v1/check", check, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={_ProblemError: _render, HTTPException: _render, Exception: _render},
        lifespan=lifespan,
    )
