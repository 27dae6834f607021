"""``POST /v1/check`` as a bare ASGI endpoint.

Every request a gateway forwards costs one check, so this route is the service's hot
path, and the framework's share of it was most of its cost: FastAPI's dependency
injection, pydantic validation of the body and the response, and half a dozen
middleware layers took more time than the decision itself. Here the body is decoded
and checked in one pass by ``msgspec`` and the decision encoded by it, with nothing in
between.

The contract is ``CheckBody``'s (``_api_models``), kept exactly:

- the token is checked before anything of the body is read (``Tokens``, constant time);
- the body is bounded (``MAX_BODY_BYTES``) on ``Content-Length`` and while it streams;
- ``_CheckArgs`` mirrors ``CheckBody`` (strict types, lengths, bounds, no unknown
  fields); what msgspec cannot say (letters-only methods, paths starting with ``/``, no
  NUL in any string) ``_accepted`` checks after decoding. msgspec itself refuses lone
  surrogates and invalid UTF-8.

A body the fast path does not accept is not answered from it: it goes to the reference
path (``_reference``: ``json.loads``, then ``CheckBody`` with pydantic, the errors
located as FastAPI locates them), so every refusal is word for word what the FastAPI
route answered, and a body that msgspec refuses but ``CheckBody`` takes (UTF-16, or
UTF-8 after a byte-order mark: ``json.loads`` reads both) is still served, slowly. The
fast path must therefore only ever accept less than the reference, and the same values;
``tests/test_server_check.py`` holds it to that with generated bodies.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from tenantguard._api_models import MAX_COUNT, MAX_ID_LENGTH, CheckBody
from tenantguard._api_problems import INTERNAL, ProblemError, invalid_fields, log, translate
from tenantguard._api_requests import ServiceState, json_object, receive_body
from tenantguard.decision import Decision
from tenantguard.guard import Guard

__all__ = ["CheckEndpoint", "decide"]

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_Optional = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
_HeaderName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_HeaderValue = Annotated[str, msgspec.Meta(max_length=4096)]


class _CheckArgs(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """``CheckBody`` as msgspec decodes it; the limits are ``CheckBody``'s."""

    tenant: _Id
    method: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
    client: _Optional | None = None
    ip: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    user: _Optional | None = None
    headers: Annotated[dict[_HeaderName, _HeaderValue], msgspec.Meta(max_length=64)] | None = None
    cost: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] = 1


_decode = msgspec.json.Decoder(_CheckArgs).decode
_encode = msgspec.json.Encoder().encode
_JSON_HEADERS = (b"content-type", b"application/json")


def _accepted(body: bytes) -> _CheckArgs | None:
    """The body's arguments when the fast path can vouch for them, else None."""
    try:
        args = _decode(body)
    except msgspec.DecodeError:  # ValidationError included
        return None
    method = args.method
    if not (method.isascii() and method.isalpha()) or args.path[0] != "/":
        return None
    if "\x00" in args.tenant or "\x00" in args.path:
        return None
    for text in (args.client, args.ip, args.user):
        if text is not None and "\x00" in text:
            return None
    if args.headers:
        for name, value in args.headers.items():
            if "\x00" in name or "\x00" in value:
                return None
    return args


async def decide(guard: Guard, args: _CheckArgs | CheckBody) -> Decision:
    """The check a validated body asks for, whichever path validated it."""
    return await guard.check(
        args.tenant,
        args.method.upper(),
        args.path,
        client=args.client,
        ip=args.ip,
        user=args.user,
        headers=args.headers,
        cost=args.cost,
    )


def _reference(body: bytes) -> CheckBody:
    """The body as the FastAPI route read it, or the problem it answered."""
    if not body:
        raise ProblemError(400, "malformed_json", "the body is empty: send a JSON object")
    data = json_object(body)
    try:
        return CheckBody.model_validate(data)
    except ValidationError as error:
        problems = error.errors(include_url=False)
        raise invalid_fields(
            {**problem, "loc": ("body", *problem["loc"])} for problem in problems
        ) from None


class CheckEndpoint:
    """The ASGI app of ``POST /v1/check``, for the service ``state`` it serves.

    It answers every request itself, errors included, as problem+json: it can sit
    anywhere in front of the framework (``server.create_app`` calls it before FastAPI's
    middleware) and nothing of it escapes as a 500 but a bug, which is logged.
    """

    def __init__(self, state: ServiceState) -> None:
        self._guard = state.guard
        self._tokens = state.tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            authorization = declared = None
            for name, value in scope["headers"]:  # the first of each, as Starlette reads them
                if name == b"authorization" and authorization is None:
                    authorization = value
                elif name == b"content-length" and declared is None:
                    declared = value
            self._tokens.authorise_header((authorization or b"").decode("latin-1"), "service")
            body = await receive_body(receive, declared or b"")
            decision = await decide(self._guard, _accepted(body) or _reference(body))
            payload = _encode(decision.as_dict())
        except ClientDisconnect:
            return  # nobody left to answer
        except Exception as error:
            problem = translate(error)
            if problem is None:
                log.error("unexpected error on POST /v1/check", exc_info=error)
                problem = ProblemError(500, "internal_error", INTERNAL)
            await problem.response()(scope, receive, send)
            return
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [_JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": payload})
