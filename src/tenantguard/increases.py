"""Limit-increase requests (``guard.increase_requests``).

A tenant asks with the facts a reviewer needs (which limit, how much, average and peak
RPS, burst pattern, endpoints, by when, why). On a ``hard`` plan the answer is known at
once: rejected, pointing to an upgrade. Otherwise the request waits; approving it
creates the override, with the requested or another value and an optional expiry.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from tenantguard.errors import TenantguardError
from tenantguard.ledger._base import EventRecord, IncreaseRequest
from tenantguard.overrides import plan_value

if TYPE_CHECKING:
    from tenantguard.guard import Guard

__all__ = ["IncreaseRequests", "RequestConflict", "UnknownRequestError"]


class UnknownRequestError(TenantguardError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class RequestConflict(TenantguardError):
    """The request was already decided."""


class IncreaseRequests:
    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    async def file(
        self,
        tenant: str,
        *,
        limit: str,
        requested: int,
        reason: str,
        avg_rps: float | None = None,
        peak_rps: float | None = None,
        burst_pattern: str | None = None,
        endpoints: Sequence[str] = (),
        needed_by: str | None = None,
    ) -> IncreaseRequest:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"requested must be a whole number >= 1, got {requested!r}")
        if not reason or not reason.strip():
            raise ValueError("say why the increase is needed (reason)")
        guard = self._guard
        now = guard.now()
        state = await guard.tenant_state(tenant)
        plan_value(guard, limit, state.slot)  # the limit must exist
        request = IncreaseRequest(
            id=f"ir_{secrets.token_hex(8)}", tenant=tenant, limit=limit, requested=requested,
            reason=reason.strip(), avg_rps=avg_rps, peak_rps=peak_rps,
            burst_pattern=burst_pattern, endpoints=tuple(endpoints), needed_by=needed_by,
            created_at=now,
        )  # fmt: skip
        if state.enforcement == "hard":
            request = replace(
                request, status="rejected", decided_at=now, decided_by="policy",
                decision_reason=(
                    f"plan {state.plan!r} is a hard plan: its limits are fixed; "
                    "upgrade the plan for higher limits"
                ),
            )  # fmt: skip
        await guard.ledger.add_request(request)
        guard.events.emit(
            EventRecord(tenant, "increase_requested", limit, now,
                        {"id": request.id, "requested": requested, "status": request.status})
        )  # fmt: skip
        return request

    async def get(self, request_id: str) -> IncreaseRequest:
        request = await self._guard.ledger.get_request(request_id)
        if request is None:
            raise UnknownRequestError(f"no increase request {request_id!r}")
        return request

    async def list(
        self, *, status: str | None = None, tenant: str | None = None
    ) -> list[IncreaseRequest]:
        return await self._guard.ledger.list_requests(status=status, tenant=tenant)

    async def approve(
        self,
        request_id: str,
        *,
        value: int | None = None,
        expires_at: float | None = None,
        actor: str = "admin",
        reason: str = "",
    ) -> IncreaseRequest:
        request = await self._pending(request_id)
        granted = request.requested if value is None else value
        await self._guard.overrides.set(
            request.tenant, request.limit, value=granted, expires_at=expires_at, actor=actor,
            reason=reason or f"increase request {request.id}: {request.reason}",
        )  # fmt: skip
        return await self._decide(
            request, status="approved", actor=actor, reason=reason or None,
            approved_value=granted, approved_expires_at=expires_at,
        )  # fmt: skip

    async def reject(
        self, request_id: str, *, reason: str, actor: str = "admin"
    ) -> IncreaseRequest:
        if not reason or not reason.strip():
            raise ValueError("say why the request is rejected (reason)")
        request = await self._pending(request_id)
        return await self._decide(request, status="rejected", actor=actor, reason=reason.strip())

    async def _pending(self, request_id: str) -> IncreaseRequest:
        request = await self.get(request_id)
        if request.status != "pending":
            raise RequestConflict(f"increase request {request_id!r} is already {request.status}")
        return request

    async def _decide(
        self,
        request: IncreaseRequest,
        *,
        status: str,
        actor: str,
        reason: str | None,
        approved_value: int | None = None,
        approved_expires_at: float | None = None,
    ) -> IncreaseRequest:
        guard = self._guard
        now = guard.now()
        decided = replace(
            request, status=status, decided_at=now, decided_by=actor, decision_reason=reason,
            approved_value=approved_value, approved_expires_at=approved_expires_at,
        )  # fmt: skip
        await guard.ledger.update_request(decided)
        guard.events.emit(
            EventRecord(request.tenant, "increase_decided", request.limit, now,
                        {"id": request.id, "status": status, "value": approved_value})
        )  # fmt: skip
        return decided
