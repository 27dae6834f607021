"""``/readyz``: whether this replica can serve checks, and the guard's start at boot.

Checks run on the tenant state the guard holds in memory, so a ledger outage leaves a
replica that has loaded that state able to serve them: it stays ready. Taking every
replica out of rotation because the ledger is down would stop the very checks the
design keeps going through the outage. Not ready (503 ``not_ready``):

- the counter store does not answer: every check would be decided by the policy's
  ``on_store_error`` alone (the rule since the first version);
- the ledger is down *and* no tenant state was ever loaded: every tenant would be
  checked on the default plan. While the ledger answers, a replica still ``loading``
  is ready, since the first check loads the state.

How stale the state is does not decide readiness (every replica would go at once);
``tenantguard_tenant_state_stale_seconds`` is there to alert on it.

Details: the 200 answer shows ``checks`` (each store's ping) and ``tenant_state`` to the
admin token only, so an open endpoint does not tell anyone how many tenants there are;
the 503 answer shows ``checks`` to anyone, as it always did, and ``tenant_state`` to
the admin token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tenantguard._api_models import Readiness, TenantStateOut
from tenantguard._api_problems import ProblemError, log
from tenantguard._api_requests import ServiceState
from tenantguard.errors import StoreError
from tenantguard.guard import Guard

__all__ = ["PING_TIMEOUT", "readiness", "start_tenant_state"]

PING_TIMEOUT = 2.0
"""Seconds ``/readyz`` waits for each store before calling it down."""


async def _ping(ping: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return bool(await asyncio.wait_for(ping(), PING_TIMEOUT))
    except Exception:  # a probe reports, it never fails
        return False


async def readiness(state: ServiceState, authorization: str) -> Readiness:
    """The ready answer for a caller sending ``authorization``; the 503 problem raised
    when not ready."""
    guard = state.guard
    checks = {"ledger": "ok" if await _ping(guard.ledger.ping) else "down"}
    ping = getattr(guard.counters, "ping", None)
    if callable(ping):
        checks["counters"] = "ok" if await _ping(ping) else "down"
    status = guard.tenant_status()
    tenant_state = TenantStateOut(
        ledger=status.ledger, stale_seconds=status.stale_seconds, tenants=status.tenants
    )
    admin = state.tokens.admits(authorization, "admin")
    policy = guard.policy.source
    down = []
    if checks.get("counters") == "down":
        down.append("counters down")
    if status.ledger == "loading" and checks["ledger"] == "down":
        down.append("ledger down and no tenant state loaded yet")
    if down:
        details = {"tenant_state": tenant_state.model_dump()} if admin else {}
        detail = "; ".join(down)
        raise ProblemError(503, "not_ready", detail, policy=policy, checks=checks, **details)
    if admin:
        return Readiness(
            status="ready", policy=policy, reload_error=guard.reload_error, checks=checks,
            tenant_state=tenant_state,
        )  # fmt: skip
    return Readiness(status="ready", policy=policy, reload_error=guard.reload_error)


async def start_tenant_state(guard: Guard) -> None:
    """``guard.start()`` at boot. A ledger that cannot be reached is no reason not to
    serve: the guard goes on trying, and ``/readyz`` is 503 until the state is loaded
    or the ledger answers."""
    try:
        await guard.start()
    except StoreError as error:
        log.warning("tenant state not loaded at start-up: %s", error)
