"""``Guard``: the engine behind every front door.

A check runs in three steps (DESIGN.md, "A check, step by step"): ``_prepare`` resolves
the tenant and the route plan and the counter keys; the store applies the specs
atomically; ``_decide`` turns the outcomes into a ``Decision``. Only the middle step
does I/O, so a synchronous facade shares the first and last without a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from tenantguard._directory import Overridden, TenantDirectory
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
from tenantguard.ledger import EventRecord, Ledger, MemoryLedger, OverrideRecord, open_ledger
from tenantguard.overrides import Overrides
from tenantguard.policy import Policy
from tenantguard.quotas import Quotas
from tenantguard.stores import CounterSpec, CounterStore, MemoryCounters, open_counters
from tenantguard.tenants import MAX_TENANT_ID, Tenants, check_tenant_id

__all__ = ["Guard", "TenantStatus"]

Clock = Callable[[], float]
Spawn = Callable[[Coroutine[Any, Any, Any]], object]
_PLAN_CACHE_SIZE = 16384
_NO_OVERRIDES: dict[str, OverrideRecord] = {}
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
    stale_seconds: float | None
    """``None`` until the state was read once."""
    tenants: int
    """Tenants held: those with a record or an override."""
    stale_checks: int


@dataclass(frozen=True, slots=True, eq=False)
class TenantState:
    """What the services need to know of a tenant: its plan under the current policy
    and the overrides in force, from the tenant directory."""

    tenant: str
    plan: str
    slot: int
    enforcement: str
    overrides: Mapping[str, OverrideRecord]
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
    names: tuple[str, ...]
    allowed: list[int]
    plan_of: Mapping[str | None, tuple[str, int]]
    """A plan's name (or ``None``) → its name and index; a name the policy lacks → the
    default plan, which ``default`` holds."""
    default: tuple[str, int]
    plan_count: int
    route_id: Callable[[str, str], int]
    routes: dict[object, RoutePlan] = field(default_factory=dict)
    """Route plans by ``route id × plans + plan index``, or for a tenant with overrides
    by ``(route id, plan index, overrides version)`` (versions are unique): by what the
    request matched, never by its raw path, so a fresh id in every path costs no more."""

    @classmethod
    def of(cls, policy: Policy) -> _PolicyView:
        default = policy.default_plan
        names = tuple(rule.name for rule in policy.rules)  # rule.slot indexes these
        plan_of: dict[str | None, tuple[str, int]] = {
            name: (name, index) for name, index in policy.plan_index.items()
        }
        plan_of[None] = plan_of[default]
        return cls(
            policy, policy.document.headers, names, [0] * len(names), plan_of, plan_of[default],
            len(policy.plan_index), policy.routes.route_id,
        )  # fmt: skip


class Guard:
    """Checks requests against a policy; see DESIGN.md for the whole API.

    ``counters`` is ``"memory"`` (default), a Redis URL or a ``CounterStore``; ``ledger``
    is ``"memory"`` (default), a ``sqlite:///`` or ``postgresql://`` URL or a ``Ledger``.
    ``clock`` returns epoch seconds and is the only time source (inject one in tests).

    Tenant records and overrides are held in memory (``tenantguard._directory``), so a
    check never waits on the ledger. With a shared ledger (SQLite file, PostgreSQL) the
    guard polls the ledger's change feed every ``tenant_ttl`` seconds (default 1): a
    change made through this guard applies at once, one made through another replica
    within ``tenant_ttl`` plus one poll's query. While the ledger does not answer,
    checks go on with the last known state (``tenant_status``).

    ``background`` starts the polls' coroutines when the check runs outside an event
    loop (``SyncGuard`` points it at its own loop); in a loop they are tasks of it.

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
        tenant_ttl: float = 1.0,
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
        # an in-process ledger has no other writer: what this guard changes it applies
        interval = math.inf if isinstance(self.ledger, MemoryLedger) else tenant_ttl
        self._directory = TenantDirectory(self.ledger, interval=interval)
        self._poller: asyncio.Task[None] | None = None
        self._polls: set[asyncio.Task[bool]] = set()
        self.background: Spawn | None = None
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
        every later one uses the new. Route plans are dropped with the old policy, since
        they embed its values; a tenant whose plan the new policy lacks is on its default
        plan until a policy names it again. Counters stay in
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
        """The tenant's plan and live overrides, from the tenant directory
        (``state.slot`` indexes ``state.policy``, which a reload may replace meanwhile)."""
        check_tenant_id(tenant)
        now = self._clock()
        view = self._view
        await self._follow(now)
        entry = self._directory.entry(tenant, now)
        plan, slot = self._plan_of(entry, view)
        overrides = entry.live if isinstance(entry, Overridden) else _NO_OVERRIDES
        policy = view.policy
        return TenantState(tenant, plan, slot, policy.enforcement(slot), overrides, policy)

    @staticmethod
    def _plan_of(entry: str | Overridden | None, view: _PolicyView) -> tuple[str, int]:
        name = entry.plan if isinstance(entry, Overridden) else entry
        return view.plan_of.get(name, view.default)

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
        """Load the tenant directory, then poll the ledger's change feed every
        ``tenant_ttl`` seconds on a task of this event loop until ``close``.

        ``serve`` calls it before it answers anything. Without it the first check (or
        tenant lookup) loads the directory and later checks start polls when due, by
        the guard's clock. A ledger that does not answer at start-up is not an error:
        every tenant is on the default plan until a poll succeeds (``tenant_status``
        says ``loading``)."""
        directory = self._directory
        now = self._clock()
        await directory.load_once(now)
        directory.next_poll = now + directory.interval
        if self._poller is None and math.isfinite(directory.interval):
            # checks still start a poll when one is overdue (a loop that ran the task
            # may be gone: ``asyncio.run(guard.start())``, then a ``SyncGuard``)
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        interval = self._directory.interval
        while True:
            await asyncio.sleep(interval)
            await self._directory.refresh(self._clock())

    async def refresh(self) -> bool:
        """Apply the ledger's tenant changes now (the first call loads every tenant);
        False when the ledger did not answer, and the last known state stays."""
        return await self._directory.refresh(self._clock())

    def tenant_status(self) -> TenantStatus:
        """How current the tenant state is, for ``/readyz`` and the metrics."""
        directory = self._directory
        ledger = "loading" if not directory.loaded else "down" if directory.down else "ok"
        stale = directory.stale_seconds(self._clock())
        return TenantStatus(
            ledger,
            None if math.isinf(stale) else stale,
            len(directory.entries),
            directory.stale_checks,
        )

    async def tenant_changed(self, tenant: str) -> None:
        """A write through this guard changed ``tenant``: apply it (and whatever else
        the feed holds) before the write returns, so this replica never lags itself."""
        await self._directory.refresh(self._clock())

    async def _follow(self, now: float) -> None:
        """Read the directory the first time it is needed; after that, start a poll in
        the background whenever one is due. Only that first read is ever awaited."""
        directory = self._directory
        if (not directory.loaded and not directory.tried) or directory.loading:
            if not isinstance(self.ledger, MemoryLedger):
                # raises outside an event loop before anything is done, which tells the
                # synchronous facade to run the call on its loop instead (see sync.py)
                asyncio.get_running_loop()
            directory.next_poll = now + directory.interval
            await directory.load_once(now)
        elif directory.due(now):
            self._spawn_poll(now)

    def _spawn_poll(self, now: float) -> None:
        refresh = self._directory.refresh(now)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self.background is None:
                refresh.close()
                self._directory.polling = False
                return
            self.background(refresh)
            return
        task = loop.create_task(refresh)
        self._polls.add(task)  # a task nobody holds may be collected mid-poll
        task.add_done_callback(self._polls.discard)

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
        if tenant.__class__ is not str or not tenant or len(tenant) > MAX_TENANT_ID:
            check_tenant_id(tenant)  # raises, saying which
        now = self._clock()
        view = self._view  # one policy for the whole check, whatever a reload does meanwhile
        directory = self._directory
        if now >= directory.next_poll:
            await self._follow(now)
        if directory.down:
            directory.stale_checks += 1
        entry = directory.entries.get(tenant)
        route_id = view.route_id(method, path)
        if entry is None or entry.__class__ is str:  # a plan's name, or none: the default
            plan, slot = view.plan_of.get(entry, view.default)
            key: object = route_id * view.plan_count + slot
        else:
            plan, slot, key, entry = self._overridden(tenant, entry, route_id, now, view)  # type: ignore[arg-type]
        route = view.routes.get(key) or self._route(key, route_id, plan, slot, entry, now, view)
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
        """Stop polling, write pending events, then close the counter store and the
        ledger."""
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        for task in list(self._polls):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        await self.events.close()
        await self._store.close()
        await self.ledger.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _overridden(
        self, tenant: str, entry: Overridden, route_id: int, now: float, view: _PolicyView
    ) -> tuple[str, int, object, str | Overridden | None]:
        """The plan of a tenant with overrides, its route plans' cache key, and the
        entry both come from (the route plan must be built from that one, never from
        one read earlier). Versions are unique, so the key needs no tenant id."""
        if entry.until <= now:  # one of them expired: work out the rest again
            found = self._directory.entry(tenant, now)
            if not isinstance(found, Overridden):
                plan, slot = view.plan_of.get(found, view.default)
                return plan, slot, route_id * view.plan_count + slot, found
            entry = found
        plan, slot = view.plan_of.get(entry.plan, view.default)
        return plan, slot, (route_id, slot, entry.version), entry

    def _route(
        self,
        key: object,
        route_id: int,
        plan: str,
        slot: int,
        entry: str | Overridden | None,
        now: float,
        view: _PolicyView,
    ) -> RoutePlan:
        policy = view.policy
        local = self._local
        overrides = entry.live if isinstance(entry, Overridden) else _NO_OVERRIDES
        route = plan_route(
            policy.routes.matched[route_id], plan, slot, policy.enforcement(slot), overrides,
            now, bind=local.bind if local is not None else None,
        )  # fmt: skip
        routes = view.routes
        if len(routes) >= _PLAN_CACHE_SIZE:
            del routes[next(iter(routes))]
        routes[key] = route
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
