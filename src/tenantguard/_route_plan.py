"""What a matched route resolves to on one plan, computed once and reused.

Effective values and counter specs depend only on the rules a request matched (its
route id, ``RouteTable.route_id``) and the plan, plus a tenant's overrides when it has
some (those plans are kept per overrides version), so the hot path looks them up in one
bounded dict instead of recomputing them per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tenantguard._effective import effective_limit
from tenantguard._rules import CompiledRule
from tenantguard.decision import RuleCheck
from tenantguard.ledger import OverrideRecord
from tenantguard.policy import UNAVAILABLE
from tenantguard.stores import CounterSpec

__all__ = ["RoutePlan", "ceiling", "plan_route", "table_id"]


@dataclass(frozen=True, slots=True, eq=False)
class RoutePlan:
    """``rules[i]`` is counted with ``specs[i]``; ``fixed`` holds the checks that touch no
    counter (unlimited, unavailable). ``unavailable`` is set when an enforced rule is not
    on the plan: the request is refused with 403 before any counter is touched.
    ``tenant_keyed`` means every spec is keyed by the tenant alone; ``leased`` that some
    rule is a concurrency rule."""

    rules: tuple[CompiledRule, ...]
    specs: tuple[CounterSpec, ...]
    fixed: tuple[RuleCheck, ...]
    unavailable: RuleCheck | None
    tenant_keyed: bool
    leased: bool
    countable: bool
    warn_at: tuple[int, ...]
    """Per spec: a ``remaining`` at or below this means the warning threshold is crossed."""
    bound: Any = None
    """Store-specific handles for ``specs`` (the memory store's tables), if any."""


def table_id(rule: CompiledRule) -> str:
    """The name a rule's counters live under: they survive a policy reload that keeps the
    rule's name, algorithm and window, and start afresh when one of those changes."""
    window = rule.lease_ttl if rule.algorithm == "concurrency" else rule.window
    return f"{rule.name}|{rule.algorithm}|{window:g}"


def ceiling(spec: CounterSpec) -> int:
    """The most one request may cost under ``spec``."""
    return spec.burst if spec.algorithm in ("token-bucket", "gcra") else spec.limit


def plan_route(
    matched: Iterable[CompiledRule],
    plan: str,
    slot: int,
    enforcement: str,
    overrides: Mapping[str, OverrideRecord],
    now: float,
    *,
    bind: Callable[[list[CounterSpec]], Any] | None = None,
) -> RoutePlan:
    """The plan for the rules a request matched (one per group), on one plan, with the
    tenant's overrides. ``bind`` lets an in-process store resolve its tables once."""
    rules, specs, fixed = [], [], []
    unavailable = None
    for rule in matched:
        value, burst = effective_limit(rule, slot, enforcement, overrides, now)
        if isinstance(value, str):  # unlimited or unavailable: no counter
            check = RuleCheck(
                rule.name,
                rule.group,
                rule.algorithm,
                str(value),
                None,
                None,
                None,
                None,
                rule.window,
                rule.shadow,
                f"{rule.name!r} is not available on plan {plan!r}"
                if value == UNAVAILABLE
                else None,
            )
            fixed.append(check)
            if value == UNAVAILABLE and not rule.shadow and unavailable is None:
                unavailable = check
            continue
        rules.append(rule)
        window = rule.lease_ttl if rule.algorithm == "concurrency" else rule.window
        specs.append(
            CounterSpec(
                table_id(rule),
                rule.algorithm,
                window,
                value,
                burst,
                not rule.shadow,
                "tenant" in rule.per,
            )
        )
    return RoutePlan(
        rules=tuple(rules),
        specs=tuple(specs),
        fixed=tuple(fixed),
        unavailable=unavailable,
        tenant_keyed=all(rule.per == ("tenant",) for rule in rules),
        leased=any(rule.algorithm == "concurrency" for rule in rules),
        countable=bool(specs) and unavailable is None,
        warn_at=tuple(
            ceiling(spec) - -(-ceiling(spec) * rule.warning_threshold // 100)
            if spec.enforce
            else -1
            for rule, spec in zip(rules, specs, strict=True)
        ),
        bound=bind(specs) if bind is not None and specs else None,
    )
