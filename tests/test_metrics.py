"""Prometheus metrics: decisions by rule and outcome, sampled check latency, reload
health, and the older counters, all in one exposition and never with a tenant id.

Every guard of the process is summed at scrape time, and other tests' guards may still
be alive, so each test compares before and after, on rule names no other test uses.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY, generate_latest

from tenantguard import Guard, StoreError, parse_policy
from tenantguard._metrics import LATENCY_BOUNDS, SAMPLE_EVERY, LatencySample
from tenantguard.algorithms import Outcome
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
