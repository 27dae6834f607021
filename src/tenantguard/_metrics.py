"""Prometheus metrics. Labels never carry tenant ids, so cardinality stays bounded.

Two kinds:

- ordinary ``prometheus_client`` counters for rare events (store errors, degraded
  decisions, policy reloads; events dropped lives in ``events.py``);
- per-check figures, which the hot path must not pay a ``.labels().inc()`` for. Each
  ``Guard`` counts its decisions in plain Python (a list item per rule for allowed
  decisions, a dict for the rarer outcomes: ``Guard._decision_counts``) and its sampled
  latencies in a ``LatencySample``; ``track(guard)`` adds the guard to a ``WeakSet``,
  and one collector,
  registered on the default registry the first time a guard is tracked, sums every live
  guard's figures when Prometheus scrapes:

  ``tenantguard_decisions_total{rule, outcome}``  every check, by the rule the decision
  names (``""`` when it names none) and the outcome (``OUTCOMES``);
  ``tenantguard_check_seconds``  a histogram of *sampled* checks (see ``SAMPLE_EVERY``);
  ``tenantguard_policy_reload_ok``  0 while a live guard's last policy reload failed
  (``Guard.reload_error`` is set), else 1.

A guard that is garbage-collected drops out of the sums (Prometheus reads the drop as a
counter reset). Counting takes no lock: checks running in several threads at once
(``SyncGuard``) may very rarely lose an increment, the price of keeping the hot path free
of locks.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tenantguard.guard import Guard

__all__ = [
    "DEGRADED_DECISIONS",
    "LATENCY_BOUNDS",
    "OUTCOMES",
    "POLICY_RELOADS",
    "SAMPLE_EVERY",
    "SAMPLE_MASK",
    "STORE_ERRORS",
    "LatencySample",
    "track",
]

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
POLICY_RELOADS = Counter(
    "tenantguard_policy_reload_total",
    "Policy file loads by the reloader, by result (ok, error): the first at start-up, "
    "then one each time the file changes.",
    ["result"],
)

OUTCOMES = ("allowed", "denied", "unavailable", "degraded", "unmatched")
"""``allowed`` (shadow denials included), ``denied`` (429), ``unavailable`` (403: the
rule is not on the plan), ``degraded`` (the counter store could not answer; decided by
``on_store_error``), ``unmatched`` (no rule of the policy matched the request)."""

SAMPLE_EVERY = 64
"""What ``tenantguard_check_seconds`` samples: of the decisions for each (rule,
outcome), the 1st, 65th, 129th… The guard's count of them, kept anyway, picks the
sample, so the other 63 checks pay one bit test and no clock read. A sampled check is
timed with the guard's clock (``time.time`` unless one is injected; an injected clock
makes the figures deterministic), from the read that starts every check to the
decision: tenant lookup, route match and the counter store's answer included. The same
rate in every (rule, outcome) keeps the quantiles unbiased; the histogram's count is the
number of *sampled* checks, ``tenantguard_decisions_total`` counts them all. A clock
stepped back mid-check counts as 0 s. A power of two."""
SAMPLE_MASK = SAMPLE_EVERY - 1

LATENCY_BOUNDS = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Upper bounds in seconds: an in-process check takes microseconds, one against Redis
a round trip (hundreds of microseconds), a degraded one up to the store's timeout."""


class LatencySample:
    """Fixed-bucket latency histogram of one guard, in plain Python numbers.

    ``counts[i]`` is the number of samples with ``LATENCY_BOUNDS[i-1] < s <=
    LATENCY_BOUNDS[i]``; the last slot holds those above every bound.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds


_GUARDS: weakref.WeakSet[Guard] = weakref.WeakSet()
_registered = False
_lock = threading.Lock()


def track(guard: Guard) -> None:
    """Include ``guard`` in the scraped figures (until it is garbage-collected).

    The collector is registered on the default registry once per process, here rather
    than at import so that importing tenantguard registers nothing it does not use.
    """
    global _registered  # noqa: PLW0603 - one registration per process
    with _lock:
        _GUARDS.add(guard)
        if not _registered:
            REGISTRY.register(_GuardCollector())
            _registered = True


class _GuardCollector(Collector):
    """Sums the live guards' decision tallies and latency samples at scrape time."""

    def describe(self) -> Iterator[Metric]:
        """The names only, so registering does not collect (and take ``_lock`` twice)."""
        yield CounterMetricFamily("tenantguard_decisions", "", labels=["rule", "outcome"])
        yield HistogramMetricFamily("tenantguard_check_seconds", "")
        yield GaugeMetricFamily("tenantguard_policy_reload_ok", "")

    def collect(self) -> Iterator[Metric]:
        with _lock:
            guards = list(_GUARDS)
        decisions: dict[tuple[str, str], int] = {}
        buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        total = 0.0
        healthy = 1
        for guard in guards:
            # copies are taken in C, so a check running meanwhile cannot break them
            for key, value in guard._decision_counts().items():
                decisions[key] = decisions.get(key, 0) + value
            sample = guard._latency
            for index, value in enumerate(sample.counts.copy()):
                buckets[index] += value
            total += sample.total
            if guard.reload_error is not None:
                healthy = 0
        family = CounterMetricFamily(
            "tenantguard_decisions",
            "Checks decided, by the rule the decision names and the outcome.",
            labels=["rule", "outcome"],
        )
        for (rule, outcome), value in sorted(decisions.items()):
            family.add_metric([rule, outcome], value)
        yield family
        cumulative, histogram = 0, []
        for bound, value in zip((*map(repr, LATENCY_BOUNDS), "+Inf"), buckets, strict=True):
            cumulative += value
            histogram.append((bound, cumulative))
        yield HistogramMetricFamily(
            "tenantguard_check_seconds",
            f"Guard.check latency, sampled: one in {SAMPLE_EVERY} decisions of each rule and "
            "outcome is timed, with the guard's clock.",
            buckets=histogram,
            sum_value=total,
        )
        yield GaugeMetricFamily(
            "tenantguard_policy_reload_ok",
            "1 when the last policy reload of every live guard succeeded (or none was tried).",
            value=healthy,
        )
