"""A loaded policy: the validated document plus everything compiled from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tenantguard._routing import RouteTable
from tenantguard._rules import CompiledQuota, CompiledRule
from tenantguard.policy._model import Plan, PolicyDocument

__all__ = ["Policy"]


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """Immutable; build one with ``load_policy`` or ``parse_policy``.

    ``plans`` fixes the plan order that every ``CompiledRule.values`` tuple follows.
    """

    source: str
    document: PolicyDocument
    plans: tuple[Plan, ...]
    rules: tuple[CompiledRule, ...]
    routes: RouteTable
    plan_index: dict[str, int] = field(repr=False)
    quotas: dict[str, CompiledQuota] = field(default_factory=dict, repr=False)
    entitlements: dict[str, tuple[Any, ...]] = field(default_factory=dict, repr=False)
    rules_by_name: dict[str, CompiledRule] = field(default_factory=dict, repr=False)

    @property
    def default_plan(self) -> str:
        return self.document.default_plan

    def rule(self, name: str) -> CompiledRule:
        return self.rules_by_name[name]

    def enforcement(self, slot: int) -> str:
        return self.plans[slot].enforcement
