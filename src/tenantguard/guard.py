"""``Guard``: the engine behind every front door.

A check runs in three steps (DESIGN.md, "A check, step by step"): ``_prepare`` resolves
the tenant and the route plan and the counter keys; the store applies the specs
atomically; ``_decide`` turns the outcomes into a ``Decision``. Only the middle step
does I/O, so a synchronous facade shares the first and last without a copy.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tenantguard._effective import effective_limit, effective_value
from tenantguard._headers import HeaderStyle
from tenantguard._leases import decode_lease, encode_lease, new_lease_id
from tenantguard._metrics import (
    DEGRADED_DECISIONS,
    OUTCOMES,
    SAMPLE_MASK,
    LatencySample,
    track,
)
from tenantguard._periods import current_period
from tenantguard._route_plan import RoutePlan, ceiling, plan_route, table_id
from tenantguard._rules import CompiledRule
from tenantguard.algorithms import NEVER, Outcome
from tenantguard.decision import Decision, RuleCheck
from tenantguard.errors import StoreError
from tenantguard.events import EventSink
from tenantguard.increases import IncreaseRequests
from tenantguard.ledger import (
    EventRecord,
    Ledger,
    MemoryLedger,
    OverrideRecord,
    TenantRecord,
    open_ledger,
)
from tenantguard.overrides import Overrides
from tenantguard.policy import Policy
from tenantguard.quotas import Quotas
from tenantguard.stores import CounterSpec, CounterStore, MemoryCounters, open_counters
from tenantguard.tenants import Tenants, check_tenant_id

__all__ = ["Guard", "TenantStatus"]

Clock = Callable[[], float]
_PLAN_CACHE_SIZE = 16384
_STATE_CACHE_SIZE = 100_000
_NOTICED_SIZE = 100_000
_ALIGNED = ("fixed-window", "sliding-window")
_RETIRED_TALLIES = 8  # replaced views whose allowed counts are kept apart, see replace_policy


def _open_counters(counters: str | CounterStore) -> CounterStore:
    return open_counters(counters) if isinstance(counters, str) else counters


def counter_key(
    rule: CompiledRule,
    tenant: str,
    client: str | None,
    ip: str | None,
    user: str | None,
    headers: Mapping[str, str] | None,
) -> str:
    """The counter key of a request under ``rule.per``.

    A lone tenant is used as is (tables are per rule, so keys of different rules never
    meet); several parts are length-prefixed so no choice of values can collide.
    """
    if rule.per == ("tenant",):
        return tenant
    values = []
    for part in rule.per:
        if part == "tenant":
            value = tenant
        elif part == "client":
            value = client or ""
        elif part == "ip":
            value = ip or ""
        elif part == "user":
            value = user or ""
        else:
            wanted = part[len("header:") :]
            value = next((v for k, v in (headers or {}).items() if k.lower() == wanted), "")
        values.append(f"{len(value)}:{value}")
    return "".join(values)


@dataclass(frozen=True, slots=True)
class TenantStatus:
    """How current the in-memory tenant state is.

    ``ledger`` is ``ok`` (the last poll answered), ``down`` (it did not: checks run on
    the last known state) or ``loading`` (no state read yet: checks use the default
    plan). ``stale_seconds`` is how long ago the state was last confirmed current (by
    the guard's clock); ``stale_checks`` counts the checks answered while ``down``."""

    ledger: str
    stale_seconds: float
    tenants: int
    stale_checks: int


@dataclass(frozen=True, slots=True, eq=False)
class TenantState:
    """What a check needs to know of a tenant, cached for at most ``tenant_ttl`` seconds
    (and never past the expiry of one of its overrides)."""

    tenant: str
    record: TenantRecord | None
    plan: str
    slot: int
    enforcement: str
    overrides: dict[str, OverrideRecord]
    version: int
    expires: float
    policy: Policy
    """The policy ``plan`` and ``slot`` refer to (a reload may have replaced it since)."""


@dataclass(frozen=True, slots=True, eq=False)
class _PolicyView:
    """A policy and the caches computed from it. ``replace_policy`` swaps the whole view
    in one assignment and a check reads it once, so every check runs on one policy from
    start to finish, also when another thread (``SyncGuard``) swaps it meanwhile.

    ``allowed[slot]`` counts the allowed decisions whose binding rule is
    ``policy.rules[slot]`` (named ``names[slot]``): a list item, the cheapest counter
    the hot path can bump. Other outcomes are rarer and go to ``Guard._tally``.
    """

    policy: Policy
    styles: tuple[HeaderStyle, ...]
    default_plan: str
    default_slot: int
    names: tuple[str, ...]
    allowed: list[int]
    states: dict[str, TenantState] = field(default_factory=dict)
    plans: dict[tuple[Any, ...], RoutePlan] = field(default_factory=dict)

    @classmethod
    def of(cls, policy: Policy) -> _PolicyView:
        default = policy.default_plan
        names = tuple(rule.name for rule in policy.rules)  # rule.slot indexes these
        return cls(
            policy, policy.document.headers, default, policy.plan_index[default],
            names, [0] * len(names),
        )  # fmt: skip


class Guard:
    """Checks requests against a policy; see DESIGN.md for the whole API.

    ``counters`` is ``"memory"`` (default), a Redis URL or a ``CounterStore``; ``ledger``
    is ``"memory"`` (default), a ``sqlite:///`` or ``postgresql://`` URL or a ``Ledger``.
    ``clock`` returns epoch seconds and is the only time source (inject one in tests).

    Tenant records and overrides are cached in process for ``tenant_ttl`` seconds
    (default 2) when the ledger is shared (SQLite file, PostgreSQL): a change made through
    this guard applies at once, one made through another replica within that bound.

    ``replace_policy`` swaps the policy while serving (``tenantguard.reload`` watches a
    file and calls it); ``reload_error`` says why the last reload failed, or is ``None``.
    Every decision is counted in plain Python and one in ``SAMPLE_EVERY`` is timed; the
    Prometheus collector in ``tenantguard._metrics`` reads both at scrape time.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        counters: str | CounterStore = "memory",
        ledger: str | Ledger = "memory",
        clock: Clock = time.time,
        tenant_ttl: float = 2.0,
    ) -> None:
        self.policy = policy
        self.reload_error: str | None = None
        self._clock = clock
        self._store = _open_counters(counters)
        self._local = self._store if isinstance(self._store, MemoryCounters) else None
        self.ledger: Ledger = open_ledger(ledger) if isinstance(ledger, str) else ledger
        self.events = EventSink(self.ledger, clock, retention=policy.document.events.retention)
        self.tenants = Tenants(self)
        self.quotas = Quotas(self)
        self.overrides = Overrides(self)
        self.increase_requests = IncreaseRequests(self)
        self._view = _PolicyView.of(policy)
        # an in-process ledger has no other writer: what this guard changes it forgets
        self._tenant_ttl = math.inf if isinstance(self.ledger, MemoryLedger) else tenant_ttl
        self._versions = itertools.count(1)
        self._noticed: dict[tuple[str, str, float], None] = {}
        # outcome -> rule named by the decision ("" for none) -> checks; allowed decisions
        # with a binding rule are in the views' lists (_PolicyView.allowed), replaced
        # views' lists in _retired until folded in here
        self._tally: dict[str, dict[str, int]] = {outcome: {} for outcome in OUTCOMES}
        self._retired: list[tuple[tuple[str, ...], list[int]]] = []
        self._tally_lock = threading.Lock()  # replace_policy and scrapes, never a check
        self._latency = LatencySample()
        track(self)

    def replace_policy(self, policy: Policy) -> None:
        """Enforce ``policy`` from the next check on.

        One assignment, so no check sees half of it: a check already under way finishes
        under the old policy (its rules, limits, headers style and ``on_store_error``),
        every later one uses the new. Route plans and cached tenant states are dropped
        with the old policy, since both embed its values. Counters stay in
        the store under their table ids (``rule|algorithm|window``), so a rule that keeps
        its name, algorithm and window carries on counting; a changed limit applies to
        the count so far from the next check. Quotas, overrides and tenants read
        ``self.policy`` when called; event retention applies from the next purge.
        """
        old, self._view = self._view, _PolicyView.of(policy)
        self.policy = policy
        self.events.retention = policy.document.events.retention
        with self._tally_lock:
            # checks still under way count in the old list: keep it a few reloads longer
            self._retired.append((old.names, old.allowed))
            if len(self._retired) > _RETIRED_TALLIES:
                names, counts = self._retired.pop(0)
                allowed = self._tally["allowed"]
                for name, count in zip(names, counts, strict=True):
                    allowed[name] = allowed.get(name, 0) + count

    def _decision_counts(self) -> dict[tuple[str, str], int]:
        """``(rule, outcome)`` -> decisions so far, for the metrics collector."""
        totals: dict[tuple[str, str], int] = {}
        with self._tally_lock:
            view = self._view
            for names, counts in (*self._retired, (view.names, view.allowed)):
                for name, count in zip(names, counts.copy(), strict=True):
                    if count:
                        totals[name, "allowed"] = totals.get((name, "allowed"), 0) + count
            for outcome, tally in self._tally.items():  # fixed keys: never resized
                for name, count in tally.copy().items():
                    totals[name, outcome] = totals.get((name, outcome), 0) + count
        return totals

    def now(self) -> float:
        return self._clock()

    @property
    def counters(self) -> CounterStore:
        """The counter store (memory, Redis…), e.g. for a readiness probe's ``ping``."""
        return self._store

    @property
    def counters_in_process(self) -> bool:
        """True when counting needs no I/O (the memory store): a check then completes
        without suspending, which the synchronous facade relies on."""
        return self._local is not None

    async def tenant_state(self, tenant: str) -> TenantState:
        """The tenant's plan and live overrides, from cache or the ledger (``state.slot``
        indexes ``state.policy``, which a reload may have replaced meanwhile)."""
        view = self._view
        state = view.states.get(tenant)
        now = self._clock()
        if state is None or state.expires <= now:
            state = await self._load_state(tenant, now, view)
        return state

    async def limits(self, tenant: str) -> dict[str, Any]:
        """Every effective rate limit, quota and entitlement of ``tenant``, with current
        usage and where each value came from (``plan``, ``override``, or
        ``contract-default`` for a contract plan's limit the contract does not set)."""
        state = await self.tenant_state(tenant)
        policy = state.policy
        now = self._clock()
        slot, enforcement = state.slot, state.enforcement
        rates = []
        for rule in policy.rules:
            value, source = effective_value(
                rule.values[slot], enforcement, state.overrides.get(rule.name), now
            )
            _, burst = effective_limit(rule, slot, enforcement, state.overrides, now)
            rates.append({
                "name": rule.name, "group": rule.group, "algorithm": rule.algorithm,
                "window": rule.window or None, "value": value, "source": source,
                "burst": burst if rule.algorithm in ("token-bucket", "gcra") else None,
                "mode": "shadow" if rule.shadow else "enforce",
            })  # fmt: skip
        rows = await self.ledger.usage(tenant)
        quotas = []
        for quota in policy.quotas.values():
            value, source = effective_value(
                quota.values[slot], enforcement, state.overrides.get(quota.name), now
            )
            period, resets_at = current_period(quota.period, now)
            mine = [row for row in rows if row.quota == quota.name and row.period == period]
            usage = [{"scope": row.scope or None, "used": row.used} for row in mine]
            quotas.append({
                "name": quota.name, "limit": value, "source": source, "per": quota.per,
                "period": quota.period, "resets_at": resets_at,
                "used": sum(row.used for row in mine) if quota.per is None else None,
                "usage": usage,
            })  # fmt: skip
        return {
            "tenant": tenant,
            "plan": state.plan,
            "enforcement": enforcement,
            "rate_limits": rates,
            "quotas": quotas,
            "entitlements": {name: values[slot] for name, values in policy.entitlements.items()},
        }

    async def start(self) -> None:
        """Load the tenant directory and follow the ledger's changes in the background
        (``serve`` calls it at start-up; a library user may, or let the first check)."""

    async def refresh(self) -> bool:
        """Apply the ledger's tenant changes now; False when the ledger did not answer."""
        return True

    def tenant_status(self) -> TenantStatus:
        """How current the tenant state is, for ``/readyz`` and the metrics."""
        return TenantStatus("ok", 0.0, 0, 0)

    def forget(self, tenant: str) -> None:
        """Drop the cached state, so the next check reads the ledger."""
        self._view.states.pop(tenant, None)

    async def _load_state(self, tenant: str, now: float, view: _PolicyView) -> TenantState:
        check_tenant_id(tenant)
        record = await self.ledger.get_tenant(tenant)
        live = {
            item.name: item
            for item in await self.ledger.overrides(tenant)
            if item.expires_at is None or item.expires_at > now
        }
        policy = view.policy
        plan, slot = view.default_plan, view.default_slot
        if record is not None and record.plan in policy.plan_index:
            plan, slot = record.plan, policy.plan_index[record.plan]
        expires = min(
            [now + self._tenant_ttl, *(o.expires_at for o in live.values() if o.expires_at)]
        )
        state = TenantState(
            tenant, record, plan, slot, policy.enforcement(slot), live,
            next(self._versions), expires, policy,
        )  # fmt: skip
        states = view.states
        if len(states) >= _STATE_CACHE_SIZE:
            del states[next(iter(states))]
        states[tenant] = state
        return state

    async def check(
        self,
        tenant: str,
        method: str,
        path: str,
        *,
        client: str | None = None,
        ip: str | None = None,
        user: str | None = None,
        headers: Mapping[str, str] | None = None,
        cost: int = 1,
    ) -> Decision:
        """Count one request and say whether it may proceed."""
        if cost.__class__ is not int or cost < 1:
            raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
        if tenant.__class__ is not str or not tenant:
            raise ValueError("tenant must be a non-empty string")
        now = self._clock()
        view = self._view  # one policy for the whole check, whatever a reload does meanwhile
        state = view.states.get(tenant)
        if state is None or state.expires <= now:
            state = await self._load_state(tenant, now, view)
        plan, slot = state.plan, state.slot
        if state.overrides:
            key: tuple[Any, ...] = (method, path, slot, tenant, state.version)
        else:
            key = (method, path, slot)
        route = view.plans.get(key) or self._route(key, state, now, view)
        lease = None
        outcomes: list[Outcome]
        keys: list[str]
        if not route.countable:
            outcomes, keys = [], []
        else:
            if route.tenant_keyed:
                keys = [tenant] * len(route.specs)
            else:
                keys = [counter_key(r, tenant, client, ip, user, headers) for r in route.rules]
            if route.leased:
                lease = new_lease_id()
            local = self._local
            if local is not None:
                outcomes = local.apply_now(route.specs, keys, cost, lease, now, route.bound)
            else:
                try:
                    outcomes = await self._store.apply(route.specs, keys, cost, lease, now, tenant)
                except StoreError as error:
                    return self._degraded(tenant, plan, route, now, error, view.policy)
        return self._decide(tenant, plan, route, keys, outcomes, cost, lease, now, view)

    async def release(self, lease: str | None) -> None:
        """End the concurrency lease of a decision; ``None`` and repeats are no-ops."""
        if lease is None:
            return
        lease_id, held = decode_lease(lease)
        now = self._clock()
        for name, key, tenant in held:
            try:
                rule = self.policy.rule(name)
            except KeyError:
                continue
            owner = tenant if "tenant" in rule.per else ""  # as the check keyed it
            try:
                await self._store.release(table_id(rule), key, lease_id, now, owner)
            except StoreError:
                # the lease expires by itself after its ttl; releasing is an optimisation
                continue

    async def close(self) -> None:
        """Write pending events, then close the counter store and the ledger."""
        await self.events.close()
        await self._store.close()
        await self.ledger.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _route(
        self, key: tuple[Any, ...], state: TenantState, now: float, view: _PolicyView
    ) -> RoutePlan:
        matched = view.policy.routes.match(key[0], key[1])
        local = self._local
        route = plan_route(
            matched, state.plan, key[2], state.enforcement, state.overrides, now,
            bind=local.bind if local is not None else None,
        )  # fmt: skip
        plans = view.plans
        if len(plans) >= _PLAN_CACHE_SIZE:
            del plans[next(iter(plans))]
        plans[key] = route
        return route

    def _degraded(
        self,
        tenant: str,
        plan: str,
        route: RoutePlan,
        now: float,
        error: StoreError,
        policy: Policy,
    ) -> Decision:
        """The counter store could not answer in time: follow ``on_store_error``.

        ``allow`` admits with no rate-limit headers (nothing was counted); ``deny``
        refuses with 429 and a one-second ``Retry-After``. Either way the decision says
        ``degraded`` and why, and nothing is raised to the caller.
        """
        mode = policy.document.on_store_error
        DEGRADED_DECISIONS.labels(mode=mode).inc()
        self._count("degraded", "", now)
        reason = f"counter store unavailable ({error}); on_store_error: {mode}"
        status, retry = (200, None) if mode == "allow" else (429, 1)
        return Decision(
            tenant,
            plan,
            status,
            None,
            None,
            None,
            None,
            retry,
            None,
            reason,
            policy.document.headers,
            now,
            route.fixed,
            None,
            True,
        )

    def _count(self, outcome: str, rule: str, started: float) -> None:
        """Count a decision; time one in ``SAMPLE_EVERY`` of each (rule, outcome), the
        first included, from ``started`` (when the check read the clock) to now."""
        counts = self._tally[outcome]
        count = counts.get(rule, 0) + 1
        counts[rule] = count
        if count & SAMPLE_MASK == 1:
            self._latency.observe(self._clock() - started)

    def _notice(
        self, kind: str, tenant: str, route: RoutePlan, index: int, outcome: Outcome, now: float
    ) -> None:
        """Emit a warning or violation event once per window per rule per tenant."""
        rule, spec = route.rules[index], route.specs[index]
        window = outcome[3] if rule.algorithm in _ALIGNED else now // (rule.window or 1.0)
        key = (tenant, f"{kind}:{rule.name}", window)
        if key in self._noticed:
            return
        if len(self._noticed) >= _NOTICED_SIZE:
            self._noticed.clear()
        self._noticed[key] = None
        self.events.emit(
            EventRecord(
                tenant, kind, rule.name, now,
                {"limit": spec.limit, "remaining": outcome[2], "reset": outcome[3]},
            )
        )  # fmt: skip

    def _decide(
        self,
        tenant: str,
        plan: str,
        route: RoutePlan,
        keys: list[str],
        outcomes: list[Outcome],
        cost: int,
        lease_id: str | None,
        now: float,
        view: _PolicyView,
    ) -> Decision:
        # the binding rule: the denial with the longest wait, else the least remaining
        denied = bound = -1
        specs = route.specs
        warn_at = route.warn_at
        crossed: list[int] | None = None
        for index, outcome in enumerate(outcomes):
            if specs[index][5]:
                if not outcome[0]:
                    if denied < 0 or outcome[4] > outcomes[denied][4]:
                        denied = index
                else:
                    if bound < 0 or outcome[2] < outcomes[bound][2]:
                        bound = index
                    if outcome[2] <= warn_at[index]:
                        crossed = [*(crossed or ()), index]
        if denied >= 0:
            self._notice("violation", tenant, route, denied, outcomes[denied], now)
        elif crossed:
            for index in crossed:
                self._notice("warning", tenant, route, index, outcomes[index], now)
        checks = (route, outcomes, cost, denied >= 0)
        if route.unavailable is not None:
            check = route.unavailable
            self._count("unavailable", check.rule, now)
            return Decision(
                tenant,
                plan,
                403,
                check.rule,
                None,
                None,
                None,
                None,
                None,
                check.reason,
                view.styles,
                now,
                route.fixed,
            )
        if denied >= 0:
            outcome = outcomes[denied]
            spec = specs[denied]
            wait = outcome[4]
            name = route.rules[denied].name
            if wait == NEVER:
                retry_after = None
                reason = _never_reason(cost, spec, name)
            else:
                retry_after = max(math.ceil(wait), 1)
                reason = f"rate limit {name!r} exceeded"
            self._count("denied", name, now)
            return Decision(
                tenant,
                plan,
                429,
                name,
                spec[3],
                outcome[2],
                outcome[3],
                retry_after,
                None,
                reason,
                view.styles,
                now,
                checks,
                _build_checks,
            )
        lease = None
        if lease_id is not None:
            held = [
                (rule.name, keys[i], tenant)
                for i, rule in enumerate(route.rules)
                if rule.algorithm == "concurrency"
            ]
            lease = encode_lease(lease_id, held)
        if bound < 0:
            # nothing binding: only unlimited or shadow rules matched, or none at all
            self._count("allowed" if route.rules or route.fixed else "unmatched", "", now)
            return Decision(
                tenant, plan, 200, None, None, None, None, None, lease, None,
                view.styles, now, checks, _build_checks,
            )  # fmt: skip
        outcome = outcomes[bound]
        rule = route.rules[bound]
        allowed, slot = view.allowed, rule.slot  # as _count() does, in a list: see _PolicyView
        count = allowed[slot] + 1
        allowed[slot] = count
        if count & SAMPLE_MASK == 1:
            self._latency.observe(self._clock() - now)
        return Decision(
            tenant, plan, 200, rule.name, specs[bound][3], outcome[2], outcome[3],
            None, lease, None, view.styles, now, checks, _build_checks,
        )  # fmt: skip


def _never_reason(cost: int, spec: CounterSpec, name: str) -> str:
    return f"cost {cost} exceeds the {ceiling(spec)} that rule {name!r} can ever admit"


def _build_checks(parts: tuple[RoutePlan, list[Outcome], int, bool]) -> tuple[RuleCheck, ...]:
    """``Decision.checks``, built on demand from what the store answered."""
    route, outcomes, cost, blocked = parts
    checks = []
    for index, (allowed, _, left, reset, retry) in enumerate(outcomes):
        rule, spec = route.rules[index], route.specs[index]
        reason = None
        remaining = left
        if allowed and blocked:
            # nothing was counted since another rule denied: report the untouched count
            verdict = "uncounted"
            remaining = min(left + cost, ceiling(spec))
        elif allowed:
            verdict = "allowed"
        else:
            verdict = "denied" if spec.enforce else "shadow-denied"
            if retry == NEVER:
                reason = _never_reason(cost, spec, rule.name)
        checks.append(
            RuleCheck(
                rule.name,
                rule.group,
                rule.algorithm,
                verdict,
                spec.limit,
                remaining,
                reset,
                retry,
                rule.window,
                rule.shadow,
                reason,
            )
        )
    return (*checks, *route.fixed)
