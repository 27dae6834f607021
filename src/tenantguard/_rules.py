"""A rate-limit rule compiled for the hot path: plain attributes, values indexed by plan."""

from __future__ import annotations

from dataclasses import dataclass

from tenantguard._paths import PathTemplate

__all__ = ["CompiledQuota", "CompiledRule"]


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """One ``rate_limits`` entry, ready to be matched and counted.

    ``slot`` numbers the rule within its policy; stores key counters by it. ``values``
    and ``bursts`` are indexed like ``Policy.plans`` so an effective value is one tuple
    lookup, never a dict walk.
    """

    slot: int
    name: str
    description: str
    group: str
    algorithm: str
    window: float
    lease_ttl: float
    per: tuple[str, ...]
    values: tuple[int | str, ...]
    bursts: tuple[int | None, ...]
    shadow: bool
    warning_threshold: int
    methods: frozenset[str] | None
    templates: tuple[PathTemplate, ...]
    excepts: tuple[PathTemplate, ...]

    def excluded(self, segments: tuple[str, ...]) -> bool:
        return any(template.matches(segments) for template in self.excepts)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledQuota:
    """One ``quotas`` entry. ``period`` is ``None`` for an entity cap (a count of things
    a tenant has), else the calendar period a usage quota resets on. ``counts_toward``
    is already expanded transitively, so acquiring one of these takes one of each."""

    name: str
    description: str
    values: tuple[int | str, ...]
    counts_toward: tuple[str, ...]
    per: str | None
    period: str | None
    warning_threshold: int
