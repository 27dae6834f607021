"""``TenantGuardMiddleware``: every HTTP request of an ASGI app checked against a ``Guard``.

Pure ASGI (no ``BaseHTTPMiddleware``): lifespan and websocket scopes pass through, and
an HTTP request is checked once before the app sees it. An allowed response gains the
decision's rate-limit headers; a denied request never reaches the app and is answered
here in the policy's ``errors`` style (``_errors_style``).

Where the tenant id comes from is the ``tenant`` option, compiled once:

- ``"header:X-Tenant-Id"``: a request header;
- ``"path:/t/{tenant}/**"``: a path segment (``{name}`` and ``*`` match one segment, a
  trailing ``/**`` any rest); the whole path is still what the policy's rules match;
- ``"host:{tenant}.api.example.com"``: a label of the ``Host`` header (port ignored);
- a callable ``(scope) -> str | None``.

A request whose tenant does not resolve goes through **unchecked** (public pages, health
checks), unless ``default_tenant`` names the tenant to count it against.

The resolvers, the header reading and ``failure`` are shared with the WSGI middleware
in ``tenantguard.sync``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from tenantguard._errors_style import Answer, problem, refusal
from tenantguard.errors import StoreError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from tenantguard.guard import Guard
    from tenantguard.policy import Policy

__all__ = ["Resolver", "TenantGuardMiddleware", "TenantSpec", "failure", "tenant_resolver"]

N = TypeVar("N")  # the server's own view of a request: an ASGI scope, a WSGI environ
TenantSpec = str | Callable[[N], str | None]
"""``"header:<name>"``, ``"path:<pattern>"``, ``"host:<pattern>"`` or ``(request) -> id``."""
Resolver = Callable[[N, Mapping[str, str], str], str | None]
"""``(native request, lower-cased headers, path) -> tenant id or None``."""


class TenantGuardMiddleware:
    """Check each HTTP request against ``guard``; see the module docstring for ``tenant``.

    ``client_header`` names the header that identifies the API client (for rules
    ``per: [client]``); the ip is the ASGI peer. A concurrency lease is released exactly
    once, at the first of: the last body message sent, the client disconnecting, the app
    returning or raising. If the guard raises (a tenant id it refuses) the answer is a
    400 problem; a ledger outage follows the policy's ``on_store_error``.
    """

    def __init__(
        self,
        app: ASGIApp,
        guard: Guard,
        *,
        tenant: TenantSpec[Scope],
        default_tenant: str | None = None,
        client_header: str | None = None,
    ) -> None:
        self.app = app
        self.guard = guard
        self.tenant = tenant_resolver(tenant, default_tenant)
        self.client_header = (client_header or "").lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        tenant = self.tenant(scope, headers, scope["path"])
        if tenant is None:
            return await self.app(scope, receive, send)
        peer = scope.get("client")
        try:
            decision = await self.guard.check(
                tenant, scope["method"], scope["path"], headers=headers,
                client=headers.get(self.client_header), ip=peer[0] if peer else None,
            )  # fmt: skip
        except (ValueError, StoreError) as error:
            if (answer := failure(self.guard.policy, error)) is None:
                return await self.app(scope, receive, send)
            return await _reply(send, answer)
        if not decision.allowed:
            style = self.guard.policy.document.errors  # read per refusal: hot reload
            return await _reply(send, refusal(style, decision))
        extra = _encode(decision.headers.items())
        if not extra and decision.lease is None:
            return await self.app(scope, receive, send)
        lease = _Lease(self.guard, decision.lease)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                await lease.end()

        async def receive_until_gone() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                await lease.end()
            return message

        try:
            await self.app(scope, receive_until_gone, send_with_headers)
        finally:
            await lease.end()


class _Lease:
    """A decision's concurrency lease, released by the first ending to call ``end``."""

    __slots__ = ("guard", "lease")

    def __init__(self, guard: Guard, lease: str | None) -> None:
        self.guard = guard
        self.lease = lease

    async def end(self) -> None:
        lease, self.lease = self.lease, None  # taken before awaiting: the others see None
        if lease is not None:
            await self.guard.release(lease)


async def _reply(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    await send({"type": "http.response.start", "status": status, "headers": _encode(headers)})
    await send({"type": "http.response.body", "body": body})


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def failure(policy: Policy, error: ValueError | StoreError) -> Answer | None:
    """The answer when the guard raised instead of deciding.

    Bad input (a tenant id the guard refuses) is a 400 problem. A ledger that cannot
    answer follows ``on_store_error``: ``allow`` lets the request through unchecked
    (``None``), ``deny`` answers 503 with ``Retry-After: 1``.
    """
    if not isinstance(error, StoreError):
        return problem(400, "invalid_request", str(error))
    if policy.document.on_store_error == "allow":
        return None
    status, headers, body = problem(
        503, "guard_unavailable", "the limits store cannot answer right now; retry shortly"
    )
    return status, [*headers, ("Retry-After", "1")], body


# -- tenant resolvers ----------------------------------------------------------------------

_TOKEN = re.compile(r"\{(\w+)\}|\*\*|\*")
_KINDS = "'header:<name>', 'path:<pattern with {tenant}>', 'host:<pattern with {tenant}>'"


def tenant_resolver(spec: TenantSpec[N], default: str | None = None) -> Resolver[N]:
    """Compile a ``tenant`` option once; the resolver answers ``default`` when the
    request names no tenant (an empty value counts as none)."""
    if callable(spec):
        call = spec
        return lambda native, headers, path: call(native) or default
    kind, _, rest = spec.partition(":")
    if kind == "header" and rest.strip():
        name = rest.strip().lower()
        return lambda native, headers, path: headers.get(name, "").strip() or default
    if kind in ("path", "host") and rest:
        match = _compile(spec, kind, rest).fullmatch
        if kind == "path":
            return lambda native, headers, path: _group(match(path)) or default
        return lambda native, headers, path: _group(match(_hostname(headers))) or default
    raise ValueError(f"tenant={spec!r} is not a tenant resolver; expected {_KINDS} or a callable")


def _compile(spec: str, kind: str, pattern: str) -> re.Pattern[str]:
    one = "[^/]+" if kind == "path" else r"[^./]+"
    tail = ""
    if kind == "path" and pattern.endswith("/**"):
        pattern, tail = pattern[:-3], "(?:/.*)?"
    parts, start, named = [], 0, 0
    for token in _TOKEN.finditer(pattern):
        parts.append(re.escape(pattern[start : token.start()]))
        start = token.end()
        if token.group(0) == "**":
            raise ValueError(f"tenant={spec!r}: '**' is only allowed as a trailing '/**' of a path")
        if token.group(1) == "tenant":
            named += 1
            parts.append(f"(?P<tenant>{one})")
        else:
            parts.append(one)
    if named != 1:
        raise ValueError(f"tenant={spec!r}: the pattern needs exactly one '{{tenant}}'")
    parts.append(re.escape(pattern[start:]))
    flags = re.IGNORECASE if kind == "host" else 0
    return re.compile("".join(parts) + tail, flags)


def _group(match: re.Match[str] | None) -> str | None:
    return None if match is None else match.group("tenant")


def _hostname(headers: Mapping[str, str]) -> str:
    host = headers.get("host", "")
    name, colon, port = host.rpartition(":")
    return (name if colon and port.isdigit() else host).lower()
