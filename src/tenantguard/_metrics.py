"""Prometheus metrics. Labels never carry tenant ids, so cardinality stays bounded."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["DEGRADED_DECISIONS", "STORE_ERRORS"]

STORE_ERRORS = Counter(
    "tenantguard_store_errors_total",
    "Counter store calls that failed or were refused by an open circuit breaker.",
    ["store", "kind"],
)
DEGRADED_DECISIONS = Counter(
    "tenantguard_degraded_decisions_total",
    "Decisions made without the counter store, by the policy's on_store_error mode.",
    ["mode"],
)
