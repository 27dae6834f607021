"""Rate-limit response headers, one renderer per style a policy can name.

- ``okta``: ``X-Rate-Limit-Limit``, ``-Remaining``, ``-Reset`` (epoch seconds).
- ``ietf``: draft-ietf-httpapi-ratelimit-headers structured fields,
  ``RateLimit-Policy: "name";q=100;w=60`` and ``RateLimit: "name";r=50;t=30``, one list
  member per enforced rule that counted the request.
- ``github``: ``x-ratelimit-limit``, ``-remaining``, ``-used``, ``-reset`` (epoch
  seconds) and ``-resource`` (the binding rule's name).

A denial also carries ``Retry-After`` (whole seconds), whatever the style.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tenantguard.decision import Decision

__all__ = ["HeaderStyle", "render_headers"]

HeaderStyle = Literal["okta", "ietf", "github"]


def render_headers(styles: tuple[HeaderStyle, ...], decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    limit, remaining, reset = decision.limit, decision.remaining or 0, decision.reset
    if limit is not None and reset is not None and decision.rule is not None:
        for style in styles:
            if style == "okta":
                headers["X-Rate-Limit-Limit"] = str(limit)
                headers["X-Rate-Limit-Remaining"] = str(remaining)
                headers["X-Rate-Limit-Reset"] = str(reset)
            elif style == "github":
                headers["x-ratelimit-limit"] = str(limit)
                headers["x-ratelimit-remaining"] = str(remaining)
                headers["x-ratelimit-used"] = str(max(limit - remaining, 0))
                headers["x-ratelimit-reset"] = str(reset)
                headers["x-ratelimit-resource"] = decision.rule
            else:
                _ietf(headers, decision)
    if decision.retry_after is not None:
        headers["Retry-After"] = str(decision.retry_after)
    return headers


def _ietf(headers: dict[str, str], decision: Decision) -> None:
    policies, states = [], []
    for check in decision.checks:
        if check.limit is None or check.shadow or check.reset is None:
            continue
        name = _sf_string(check.rule)
        window = max(math.ceil(check.window), 1) if check.window else None
        policies.append(f"{name};q={check.limit}" + (f";w={window}" if window else ""))
        until = max(math.ceil(check.reset - decision.now), 0)
        states.append(f"{name};r={check.remaining or 0};t={until}")
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(states)


def _sf_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
