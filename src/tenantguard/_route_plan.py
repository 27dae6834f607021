"""What a (method, path, plan) resolves to, computed once and reused.

Matching, effective values and counter specs depend only on the route and the plan
(overrides, when a tenant has them, bypass the cache), so the hot path looks them up in
one bounded dict instead of recomputing them per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tenantguard._rules import CompiledRule
from tenantguard.decision import RuleCheck
from tenantguard.stores import CounterSpec

__all__ = ["RoutePlan"]


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
