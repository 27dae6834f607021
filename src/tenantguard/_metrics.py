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
  (``Guard.reload_error`` is set), else 1;
  ``tenantguard_stale_checks_total``  checks answered while the ledger was down, and
  ``tenantguard_tenant_state_stale_seconds``  how long ago the tenant state was last
  confirmed current (the largest of the live guards), both from ``Guard.tenant_status``.

A guard that is garbage-collected drops out of the sums (Prometheus reads the drop as a
counter reset). Counting takes no lock: checks running in several threads at once
(``SyncGuard``) may very rarely lose an increment, the price of keeping the hot path free
of locks.

When several worker processes serve one port, ``WorkerMetrics`` makes each worker's
``/metrics`` speak for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tenantguard.guard import Guard

__all__ = [
    "DEGRADED_DECISIONS",
    "LATENCY_BOUNDS",
    "OUTCOMES",
    "POLICY_RELOADS",
    "PUBLISH_INTERVAL",
    "SAMPLE_EVERY",
    "SAMPLE_MASK",
    "STORE_ERRORS",
    "Figures",
    "LatencySample",
    "WorkerMetrics",
    "track",
    "worker_exited",
]

logger = logging.getLogger("tenantguard")

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


@dataclass(slots=True)
class Figures:
    """What the collector reports, summed over guards (of this process, or of every
    worker's published file). ``reload_ok`` and ``stale_seconds`` are gauges: the
    worst of the live guards, not a sum."""

    decisions: dict[tuple[str, str], int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0
    stale_checks: int = 0
    reload_ok: int = 1
    stale_seconds: float = 0.0

    def add_counts(self, other: Figures) -> None:
        """Add ``other``'s counters (not its gauges) to these."""
        for key, value in other.decisions.items():
            self.decisions[key] = self.decisions.get(key, 0) + value
        for index, value in enumerate(other.buckets):
            self.buckets[index] += value
        self.latency_sum += other.latency_sum
        self.stale_checks += other.stale_checks

    def add_gauges(self, other: Figures) -> None:
        """Take the worse of these gauges and ``other``'s."""
        self.reload_ok = min(self.reload_ok, other.reload_ok)
        self.stale_seconds = max(self.stale_seconds, other.stale_seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "decisions": [[rule, outcome, n] for (rule, outcome), n in self.decisions.items()],
            "buckets": self.buckets,
            "latency_sum": self.latency_sum,
            "stale_checks": self.stale_checks,
            "reload_ok": self.reload_ok,
            "stale_seconds": self.stale_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figures:
        buckets = [int(value) for value in data["buckets"]]
        if len(buckets) != len(LATENCY_BOUNDS) + 1:
            raise ValueError("latency buckets of another version")
        return cls(
            decisions={(str(r), str(o)): int(n) for r, o, n in data["decisions"]},
            buckets=buckets,
            latency_sum=float(data["latency_sum"]),
            stale_checks=int(data["stale_checks"]),
            reload_ok=int(data["reload_ok"]),
            stale_seconds=float(data["stale_seconds"]),
        )


def _live_figures() -> Figures:
    """The figures of this process's live guards."""
    with _lock:
        guards = list(_GUARDS)
    total = Figures()
    for guard in guards:
        # copies are taken in C, so a check running meanwhile cannot break them
        status = guard.tenant_status()
        total.add_counts(
            Figures(
                decisions=guard._decision_counts(),
                buckets=guard._latency.counts.copy(),
                latency_sum=guard._latency.total,
                stale_checks=status.stale_checks,
            )
        )
        reload_ok = 0 if guard.reload_error is not None else 1
        # a state never read has no age: /readyz reports it (loading), not this gauge
        stale = status.stale_seconds or 0.0
        total.add_gauges(Figures(reload_ok=reload_ok, stale_seconds=stale))
    return total


def _families(figures: Figures) -> Iterator[Metric]:
    family = CounterMetricFamily(
        "tenantguard_decisions",
        "Checks decided, by the rule the decision names and the outcome.",
        labels=["rule", "outcome"],
    )
    for (rule, outcome), value in sorted(figures.decisions.items()):
        family.add_metric([rule, outcome], value)
    yield family
    cumulative, histogram = 0, []
    for bound, value in zip((*map(repr, LATENCY_BOUNDS), "+Inf"), figures.buckets, strict=True):
        cumulative += value
        histogram.append((bound, cumulative))
    yield HistogramMetricFamily(
        "tenantguard_check_seconds",
        f"Guard.check latency, sampled: one in {SAMPLE_EVERY} decisions of each rule and "
        "outcome is timed, with the guard's clock.",
        buckets=histogram,
        sum_value=figures.latency_sum,
    )
    yield GaugeMetricFamily(
        "tenantguard_policy_reload_ok",
        "1 when the last policy reload of every live guard succeeded (or none was tried).",
        value=figures.reload_ok,
    )
    yield CounterMetricFamily(
        "tenantguard_stale_checks",
        "Checks answered while the ledger was down, on the tenant state last read from it.",
        value=figures.stale_checks,
    )
    yield GaugeMetricFamily(
        "tenantguard_tenant_state_stale_seconds",
        "Seconds since the tenant state was last confirmed current by the ledger "
        "(0 while it follows the ledger; a state never read counts 0, /readyz reports it); "
        "the largest of the live guards.",
        value=figures.stale_seconds,
    )


class _GuardCollector(Collector):
    """Sums the live guards' figures at scrape time."""

    def describe(self) -> Iterator[Metric]:
        """The names only, so registering does not collect (and take ``_lock`` twice)."""
        yield CounterMetricFamily("tenantguard_decisions", "", labels=["rule", "outcome"])
        yield HistogramMetricFamily("tenantguard_check_seconds", "")
        yield GaugeMetricFamily("tenantguard_policy_reload_ok", "")
        yield CounterMetricFamily("tenantguard_stale_checks", "")
        yield GaugeMetricFamily("tenantguard_tenant_state_stale_seconds", "")

    def collect(self) -> Iterator[Metric]:
        return _families(_live_figures())


# several worker processes -----------------------------------------------------------

PUBLISH_INTERVAL = 1.0
"""Seconds between two publications of a worker's figures: how far behind the other
workers' figures in one worker's ``/metrics`` may be."""

_PREFIX = "guards_"
_LIVE = ".json"
_DEAD = ".dead.json"


class WorkerMetrics:
    """``/metrics`` of one worker among several serving one port (``serve --workers``).

    A scrape reaches one worker, which must answer for all of them. The counters kept
    with ``prometheus_client`` are summed by its multiprocess mode: the parent points
    ``PROMETHEUS_MULTIPROC_DIR`` at ``directory`` before the workers start, and each
    counts in its own file there. The guard's figures are plain Python numbers in each
    process, so each worker publishes them to ``directory`` too (``guards_<pid>.json``,
    replaced whole) every ``PUBLISH_INTERVAL`` seconds, at shutdown, and before it
    answers a scrape; the scrape sums every worker's file.

    The files of workers that died stay, renamed by the parent (``worker_exited``):
    their counts are kept in the sums, so no counter goes backwards when a worker is
    replaced (up to ``PUBLISH_INTERVAL`` of a killed worker's last counts are lost),
    while the gauges speak for the live workers only.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._file = self.directory / f"{_PREFIX}{os.getpid()}{_LIVE}"
        self._scratch = self.directory / f".{_PREFIX}{os.getpid()}.tmp"

    def publish(self) -> None:
        """Write this process's figures for the other workers to read."""
        self._scratch.write_text(json.dumps(_live_figures().to_json()), encoding="utf-8")
        os.replace(self._scratch, self._file)

    async def run(self, interval: float = PUBLISH_INTERVAL) -> None:
        """Publish every ``interval`` seconds until cancelled, and once more then."""
        try:
            while True:
                self.publish()
                await asyncio.sleep(interval)
        finally:
            self.publish()

    def exposition(self) -> bytes:
        """The Prometheus text of every worker's metrics."""
        self.publish()
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        registry.register(_WorkersCollector(self.directory))
        return generate_latest(registry)


def worker_exited(directory: str | Path, pid: int) -> None:
    """Keep the counts of a worker that ended, and drop it from the gauges (the parent
    calls this once it has reaped the process)."""
    live = Path(directory) / f"{_PREFIX}{pid}{_LIVE}"
    with contextlib.suppress(FileNotFoundError):  # it died before it ever published
        os.replace(live, live.with_name(f"{_PREFIX}{pid}{_DEAD}"))
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def _read_figures(path: Path) -> Figures | None:
    try:
        return Figures.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("metrics file %s skipped: %s", path, error)
        return None


class _WorkersCollector(Collector):
    """Sums the figures every worker published in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        pids = set()
        for path in self.directory.glob(f"{_PREFIX}*.json"):
            pid = path.name[len(_PREFIX) :].split(".", 1)[0]
            if pid.isdigit():
                pids.add(pid)
        total = Figures()
        for pid in sorted(pids):
            live = self.directory / f"{_PREFIX}{pid}{_LIVE}"
            figures = _read_figures(live)
            if figures is not None:
                total.add_gauges(figures)
            else:  # ended, perhaps just now: its file was renamed between glob and read
                figures = _read_figures(live.with_name(f"{_PREFIX}{pid}{_DEAD}"))
            if figures is not None:
                total.add_counts(figures)
        return _families(total)
