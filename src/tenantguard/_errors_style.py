"""Error answers in the style a policy names (``errors:``), for every front door.

A refusal (429 rate limited, 403 not available on the plan) is rendered as:

- ``problem+json`` (RFC 9457): ``type``, ``title``, ``status``, ``detail``, ``code``
  (``rate_limited`` or ``not_available``), ``rule``, ``limit``, ``retry_after``;
- ``okta``: ``errorCode`` ``E0000047`` (``E0000006`` for a 403), ``errorSummary``,
  ``errorLink``, a random ``errorId`` and empty ``errorCauses``, as Okta answers;
- ``logto``: ``code`` (``guard.rate_limit_exceeded`` or ``guard.not_available``),
  ``message`` and ``data`` with the rule, limit, remaining, reset and retry-after.

Each answer carries the decision's headers (``Retry-After`` on a 429 that can be
retried). An error of the caller (a bad tenant id) is problem+json in every style: it
is the front door's error, not the rate limit's. Answers are plain
``(status, headers, body)`` triples so that ASGI, WSGI and the service share them.
"""

from __future__ import annotations

import json
import secrets
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tenantguard.decision import Decision

__all__ = ["Answer", "ErrorStyle", "problem", "refusal"]

ErrorStyle = Literal["problem+json", "okta", "logto"]
Answer = tuple[int, list[tuple[str, str]], bytes]
"""``(status, headers, body)`` of a response the front door sends itself."""

PROBLEM_TYPE = "urn:tenantguard:problem:"
_TITLES = {429: "Rate limit exceeded", 403: "Not available on this plan"}
_OKTA = {
    429: ("E0000047", "API call exceeded rate limit due to too many requests."),
    403: ("E0000006", "You do not have permission to perform the requested action"),
}


def problem(status: int, code: str, detail: str, **extra: Any) -> Answer:
    """An RFC 9457 problem, with the stable ``code`` a client can switch on."""
    body = {
        "type": PROBLEM_TYPE + code,
        "title": _TITLES.get(status) or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return _answer(status, "application/problem+json", body, {})


def refusal(style: ErrorStyle, decision: Decision) -> Answer:
    """The answer to a denied decision (``decision.status`` is 429 or 403)."""
    status = decision.status
    headers = decision.headers
    if style == "okta":
        code, summary = _OKTA.get(status, _OKTA[429])
        body: dict[str, Any] = {
            "errorCode": code,
            "errorSummary": summary,
            "errorLink": code,
            "errorId": "oae" + secrets.token_hex(11),
            "errorCauses": [],
        }
        return _answer(status, "application/json", body, headers)
    limited = status == 429
    facts = {"rule": decision.rule, "limit": decision.limit, "retry_after": decision.retry_after}
    detail = decision.reason or ("rate limit exceeded" if limited else "not available")
    if style == "logto":
        body = {
            "code": "guard.rate_limit_exceeded" if limited else "guard.not_available",
            "message": detail,
            "data": {**facts, "remaining": decision.remaining, "reset": decision.reset},
        }
        return _answer(status, "application/json", body, headers)
    code = "rate_limited" if limited else "not_available"
    answer = problem(status, code, detail, **facts)
    return status, [*answer[1], *headers.items()], answer[2]


def _answer(
    status: int, content_type: str, body: dict[str, Any], headers: dict[str, str]
) -> Answer:
    data = json.dumps(body, separators=(",", ":")).encode()
    fixed = [("Content-Type", content_type), ("Content-Length", str(len(data)))]
    return status, [*fixed, *headers.items()], data
