"""Prometheus metrics: decisions by rule and outcome, sampled check latency, reload
health, and the older counters, all in one exposition and never with a tenant id.

Every guard of the process is summed at scrape time, and other tests' guards may still
be alive, so each test compares before and after, on rule names no other test uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, generate_latest

from tenantguard import Guard, StoreError, parse_policy
from tenantguard._metrics import (
    LATENCY_BOUNDS,
    SAMPLE_EVERY,
    Figures,
    LatencySample,
    WorkerMetrics,
    worker_exited,
)
from tenantguard.algorithms import Outcome
from tenantguard.guard import TenantStatus
from tenantguard.stores import CounterSpec

MINUTE = 1_700_000_040.0
TENANT = "tenant-4f1c9e-secret"

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
on_store_error: allow
rate_limits:
  - name: m-reports
    match: {paths: ["/reports/**"]}
    window: 1m
    limits: {default: 2}
  - name: m-orgs
    match: {paths: ["/orgs"]}
    window: 1m
    limits: {default: unavailable}
  - name: m-free
    match: {paths: ["/free"]}
    window: 1m
    limits: {default: unlimited}
"""


def make() -> Guard:
    return Guard(parse_policy(POLICY), clock=lambda: MINUTE)


def decisions(rule: str, outcome: str) -> float:
    labels = {"rule": rule, "outcome": outcome}
    return REGISTRY.get_sample_value("tenantguard_decisions_total", labels) or 0.0


def sampled() -> float:
    return REGISTRY.get_sample_value("tenantguard_check_seconds_count") or 0.0


async def test_decisions_by_rule_and_outcome_without_tenant_ids() -> None:
    cases = [
        ("m-reports", "allowed"),
        ("m-reports", "denied"),
        ("m-orgs", "unavailable"),
        ("", "allowed"),
        ("", "unmatched"),
    ]
    before = {case: decisions(*case) for case in cases}
    guard = make()
    for _ in range(3):
        await guard.check(TENANT, "GET", "/reports/1")  # 2 allowed, then denied
    await guard.check(TENANT, "GET", "/orgs")
    await guard.check(TENANT, "GET", "/free")  # unlimited: allowed, no binding rule
    await guard.check(TENANT, "GET", "/elsewhere")

    after = {case: decisions(*case) - before[case] for case in cases}
    assert after == {
        ("m-reports", "allowed"): 2,
        ("m-reports", "denied"): 1,
        ("m-orgs", "unavailable"): 1,
        ("", "allowed"): 1,
        ("", "unmatched"): 1,
    }
    text = generate_latest(REGISTRY).decode()
    assert TENANT not in text
    assert 'tenantguard_decisions_total{outcome="denied",rule="m-reports"}' in text
    for labels in re.findall(r"^tenantguard_decisions_total\{(.*)\}", text, re.MULTILINE):
        assert sorted(re.findall(r"(\w+)=", labels)) == ["outcome", "rule"]
    # the histogram, the reload gauge and the counters that existed before
    assert 'tenantguard_check_seconds_bucket{le="+Inf"}' in text
    assert "tenantguard_check_seconds_sum" in text
    assert "tenantguard_policy_reload_ok" in text
    for name in ("store_errors", "degraded_decisions", "events_dropped", "policy_reload"):
        assert f"# TYPE tenantguard_{name}_total counter" in text


async def test_two_guards_add_up_and_a_collected_guard_drops_out() -> None:
    gc.collect()  # earlier tests' guards must not drop out in the middle of this one
    before = decisions("m-reports", "allowed")
    first, second = make(), make()
    await first.check("a", "GET", "/reports/1")
    await first.check("b", "GET", "/reports/1")
    await second.check("a", "GET", "/reports/1")
    assert decisions("m-reports", "allowed") == before + 3
    del second
    gc.collect()
    assert decisions("m-reports", "allowed") == before + 2
    await first.close()


def bucket(le: str) -> float:
    return REGISTRY.get_sample_value("tenantguard_check_seconds_bucket", {"le": le}) or 0.0


async def test_one_decision_in_sample_every_of_each_rule_and_outcome_is_timed() -> None:
    guard = make()
    before = sampled()
    await guard.check("acme", "GET", "/elsewhere")  # the first of ("", unmatched)
    assert sampled() == before + 1
    for _ in range(SAMPLE_EVERY * 2):
        await guard.check("acme", "GET", "/elsewhere")
    # decisions 1, 1 + SAMPLE_EVERY and 1 + 2 * SAMPLE_EVERY
    assert sampled() == before + 3
    await guard.check("acme", "GET", "/reports/1")  # the first of (m-reports, allowed)
    assert sampled() == before + 4
    assert bucket("+Inf") == sampled()


class SteppingClock:
    """Each read is ``step`` seconds after the last: a check reads it once to start."""

    def __init__(self, step: float) -> None:
        self.now = MINUTE
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_a_sampled_check_is_timed_with_the_guards_clock() -> None:
    guard = Guard(parse_policy(POLICY), clock=SteppingClock(0.003))
    count, total = sampled(), REGISTRY.get_sample_value("tenantguard_check_seconds_sum")
    small, large = bucket("0.0025"), bucket("0.005")
    await guard.check("acme", "GET", "/reports/1")
    assert sampled() == count + 1
    assert (bucket("0.0025"), bucket("0.005")) == (small, large + 1)
    after = REGISTRY.get_sample_value("tenantguard_check_seconds_sum")
    assert after is not None
    assert after - (total or 0.0) == pytest.approx(0.003, abs=1e-6)  # epoch float resolution


async def test_allowed_counts_survive_policy_reloads() -> None:
    gc.collect()
    before = decisions("m-reports", "allowed")
    guard = Guard(parse_policy(POLICY.replace("{default: 2}", "{default: 100}")))
    await guard.check("acme", "GET", "/reports/1")
    for reload in range(12):  # past the reloads whose counts are kept apart
        guard.replace_policy(parse_policy(POLICY.replace("{default: 2}", "{default: 100}")))
        await guard.check("acme", "GET", "/reports/1")
        assert decisions("m-reports", "allowed") == before + reload + 2
    # a policy without the rule: its count stays
    guard.replace_policy(parse_policy(POLICY.replace("m-reports", "m-renamed")))
    assert decisions("m-reports", "allowed") == before + 13


class FailingCounters:
    async def apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
        tenant: str = "",
    ) -> list[Outcome]:
        raise StoreError("down")

    async def release(self, table: str, key: str, lease: str, now: float, tenant: str = "") -> None:
        raise StoreError("down")

    async def close(self) -> None:
        return None


async def test_degraded_decisions_are_counted_and_timed() -> None:
    degraded = decisions("", "degraded")
    mode = REGISTRY.get_sample_value("tenantguard_degraded_decisions_total", {"mode": "allow"})
    guard = Guard(parse_policy(POLICY), counters=FailingCounters(), clock=lambda: MINUTE)
    before = sampled()
    decision = await guard.check("acme", "GET", "/reports/1")
    assert decision.allowed
    assert decisions("", "degraded") == degraded + 1
    after = REGISTRY.get_sample_value("tenantguard_degraded_decisions_total", {"mode": "allow"})
    assert after == (mode or 0.0) + 1
    assert sampled() == before + 1


def test_latency_buckets_are_upper_bounds() -> None:
    sample = LatencySample()
    for seconds in (LATENCY_BOUNDS[0], LATENCY_BOUNDS[0] * 1.01, 5.0):
        sample.observe(seconds)
    assert sample.counts[0] == 1  # le is inclusive
    assert sample.counts[1] == 1
    assert sample.counts[-1] == 1  # above every bound: only in +Inf
    assert sample.total == LATENCY_BOUNDS[0] * 2.01 + 5.0


# the tenant state -----------------------------------------------------------------


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_stale_checks_and_staleness_come_from_the_tenant_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guard = make()
    before = sample("tenantguard_stale_checks_total")
    monkeypatch.setattr(guard, "tenant_status", lambda: TenantStatus("down", 3e6, 4, 7))
    assert sample("tenantguard_stale_checks_total") == before + 7
    assert sample("tenantguard_tenant_state_stale_seconds") == 3e6  # the largest
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE tenantguard_stale_checks_total counter" in text
    assert "# TYPE tenantguard_tenant_state_stale_seconds gauge" in text
    # a state never read has no age: it counts 0 here (/readyz reports it)
    never = SimpleNamespace(ledger="loading", stale_seconds=None, tenants=0, stale_checks=0)
    monkeypatch.setattr(guard, "tenant_status", lambda: never)
    assert sample("tenantguard_tenant_state_stale_seconds") < 3e6
    await guard.close()


# several workers ------------------------------------------------------------------


def published(directory: Path, pid: int, figures: Figures, *, dead: bool = False) -> None:
    """What another worker would have written."""
    name = f"guards_{pid}.dead.json" if dead else f"guards_{pid}.json"
    (directory / name).write_text(json.dumps(figures.to_json()), encoding="utf-8")


def value(text: str, sample_line: str) -> float:
    match = re.search(rf"^{re.escape(sample_line)} (\S+)$", text, re.MULTILINE)
    assert match is not None, sample_line
    return float(match[1])


W_ALLOWED = 'tenantguard_decisions_total{outcome="allowed",rule="w-only"}'


async def test_a_workers_metrics_sum_every_worker_and_keep_the_dead(tmp_path: Path) -> None:
    guard = Guard(parse_policy(POLICY.replace("m-reports", "w-only")), clock=lambda: MINUTE)
    await guard.check("acme", "GET", "/reports/1")
    other = Figures(decisions={("w-only", "allowed"): 10}, stale_checks=2, stale_seconds=5e6)
    other.reload_ok = 0
    published(tmp_path, 4_000_001, other)
    gone = Figures(decisions={("w-only", "allowed"): 100}, stale_seconds=9e9)
    gone.buckets[0] = 3
    published(tmp_path, 4_000_002, gone, dead=True)
    (tmp_path / "guards_x.json").write_text("not mine", encoding="utf-8")  # ignored
    metrics = WorkerMetrics(tmp_path)

    text = metrics.exposition().decode()
    assert value(text, W_ALLOWED) == 1 + 10 + 100
    assert value(text, "tenantguard_tenant_state_stale_seconds") == 5e6  # not the dead one's
    assert value(text, "tenantguard_policy_reload_ok") == 0
    assert value(text, 'tenantguard_check_seconds_bucket{le="5e-06"}') >= 3
    assert (tmp_path / f"guards_{os.getpid()}.json").is_file()  # this worker published too

    worker_exited(tmp_path, 4_000_001)
    text = metrics.exposition().decode()
    assert value(text, W_ALLOWED) == 111  # its counts stay
    assert value(text, "tenantguard_tenant_state_stale_seconds") < 5e6  # its gauges go
    assert value(text, "tenantguard_policy_reload_ok") == 1
    worker_exited(tmp_path, 4_000_003)  # one that never published: nothing to keep
    await guard.close()


async def test_a_worker_publishes_until_stopped_and_once_more(tmp_path: Path) -> None:
    guard = Guard(parse_policy(POLICY.replace("m-reports", "w-final")), clock=lambda: MINUTE)
    metrics = WorkerMetrics(tmp_path)
    mine = tmp_path / f"guards_{os.getpid()}.json"
    publishing = asyncio.get_running_loop().create_task(metrics.run(interval=3600))
    await asyncio.sleep(0)  # the first publication
    assert mine.is_file()
    await guard.check("acme", "GET", "/reports/1")
    publishing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publishing
    figures = Figures.from_json(json.loads(mine.read_text(encoding="utf-8")))
    assert figures.decisions[("w-final", "allowed")] == 1
    await guard.close()
