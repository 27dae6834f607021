"""Hot reload: a changed policy file applies from the next check, keeps the counters of
unchanged rules and drops no request; a broken file keeps the old policy and says why.

Nothing here sleeps: ``reload_now()`` is one poll, and the store that holds checks in
flight is released by an ``asyncio.Event``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from starlette.types import Message, Receive, Scope, Send

from tenantguard import Decision, Guard, load_policy, parse_policy
from tenantguard.algorithms import Outcome
from tenantguard.reload import PolicyReloader
from tenantguard.stores import CounterSpec, MemoryCounters

MINUTE = 1_700_000_040.0

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
default_plan: free
headers: [HEADERS]
rate_limits:
  - name: reports
    match: {paths: ["/reports/**"]}
    window: 1m
    limits: {free: LIMIT, pro: 50}
  - name: search
    match: {paths: ["/search"]}
    window: WINDOW
    limits: {default: 10}
"""


def policy_text(limit: object = 5, window: str = "1m", headers: str = "okta") -> str:
    text = POLICY.replace("LIMIT", str(limit)).replace("WINDOW", window)
    return text.replace("HEADERS", headers)


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("tenantguard_policy_reload_total", {"result": result}) or 0.0


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text())
    return path


async def primed(path: Path, guard: Guard) -> PolicyReloader:
    """A reloader whose first poll (which always loads) is behind it."""
    reloader = PolicyReloader(guard, path)
    assert await reloader.reload_now()
    return reloader


async def test_a_changed_limit_applies_from_the_next_check_and_counters_survive(
    policy_file: Path,
) -> None:
    guard = Guard(load_policy(policy_file), clock=lambda: MINUTE)
    reloader = await primed(policy_file, guard)
    for _ in range(3):
        reports = await guard.check("acme", "GET", "/reports/1")
    assert (reports.limit, reports.remaining) == (5, 2)
    for _ in range(2):
        search = await guard.check("acme", "GET", "/search")
    assert search.remaining == 8
    old = guard.policy

    # reports keeps name, algorithm and window: same counter, new limit
    # search changes its window: a new counter
    policy_file.write_text(policy_text(limit=4, window="2m"))
    assert await reloader.reload_now()
    assert guard.policy is not old
    assert guard.reload_error is None

    reports = await guard.check("acme", "GET", "/reports/1")
    assert (reports.allowed, reports.limit, reports.remaining) == (True, 4, 0)
    assert (await guard.check("acme", "GET", "/reports/1")).status == 429
    search = await guard.check("acme", "GET", "/search")
    assert (search.limit, search.remaining) == (10, 9)

    # nothing changed: nothing reloaded
    before = reloads("ok")
    assert not await reloader.reload_now()
    policy_file.touch()
    assert not await reloader.reload_now()
    assert reloads("ok") == before


class HeldCounters:
    """Memory counters that answer only once ``gate`` is set, so checks stay in flight."""

    def __init__(self) -> None:
        self.inner = MemoryCounters()
        self.gate = asyncio.Event()
        self.waiting = 0
        self.arrivals = asyncio.Condition()

    async def apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
        tenant: str = "",
    ) -> list[Outcome]:
        async with self.arrivals:
            self.waiting += 1
            self.arrivals.notify_all()
        await self.gate.wait()
        return await self.inner.apply(specs, keys, cost, lease, now, tenant)

    async def until_waiting(self, count: int) -> None:
        async with self.arrivals:
            await self.arrivals.wait_for(lambda: self.waiting >= count)

    async def release(self, table: str, key: str, lease: str, now: float, tenant: str = "") -> None:
        await self.inner.release(table, key, lease, now, tenant)

    async def close(self) -> None:
        await self.inner.close()


async def test_checks_in_flight_finish_on_the_old_policy_and_none_is_dropped(
    policy_file: Path,
) -> None:
    store = HeldCounters()
    guard = Guard(load_policy(policy_file), counters=store, clock=lambda: MINUTE)
    reloader = await primed(policy_file, guard)

    def check() -> asyncio.Task[Decision]:
        return asyncio.create_task(guard.check("acme", "GET", "/reports/1"))

    before = [check() for _ in range(5)]
    await store.until_waiting(5)
    policy_file.write_text(policy_text(limit=2, headers="github"))
    assert await reloader.reload_now()  # while five checks wait on the store
    after = [check() for _ in range(5)]
    await store.until_waiting(10)
    store.gate.set()
    decisions = await asyncio.gather(*before, *after)

    assert len(decisions) == 10
    for decision in decisions[:5]:  # the old policy: limit 5, okta headers, all admitted
        assert (decision.allowed, decision.limit) == (True, 5)
        assert decision.headers["X-Rate-Limit-Limit"] == "5"
    for decision in decisions[5:]:  # the new one, on the same counter: 5 used of 2
        assert (decision.allowed, decision.limit, decision.rule) == (False, 2, "reports")
        assert decision.headers["x-ratelimit-limit"] == "2"


async def test_an_invalid_file_keeps_the_old_policy_and_says_where(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gc.collect()  # guards of earlier tests must not hold the health gauge down
    guard = Guard(load_policy(policy_file), clock=lambda: MINUTE)
    reloader = await primed(policy_file, guard)
    await guard.check("acme", "GET", "/reports/1")
    good = guard.policy
    errors = reloads("error")

    broken = policy_text(limit="lots")
    line = broken.splitlines().index("    limits: {free: lots, pro: 50}") + 1
    policy_file.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="tenantguard"):
        assert not await reloader.reload_now()

    assert guard.policy is good
    assert guard.reload_error is not None
    assert f"{policy_file}:{line}: rate_limits[0] (reports).limits.free" in guard.reload_error
    assert f"{policy_file}:{line}:" in caplog.text
    assert reloads("error") == errors + 1
    assert REGISTRY.get_sample_value("tenantguard_policy_reload_ok") == 0
    decision = await guard.check("acme", "GET", "/reports/1")  # still the old limit
    assert (decision.limit, decision.remaining) == (5, 3)

    # polled again, unchanged: reported once
    assert not await reloader.reload_now()
    assert reloads("error") == errors + 1

    policy_file.write_text(policy_text(limit=7))
    assert await reloader.reload_now()
    assert guard.reload_error is None
    assert REGISTRY.get_sample_value("tenantguard_policy_reload_ok") == 1
    decision = await guard.check("acme", "GET", "/reports/1")
    assert (decision.limit, decision.remaining) == (7, 4)


async def test_a_missing_file_is_reported_until_it_is_back(policy_file: Path) -> None:
    guard = Guard(load_policy(policy_file), clock=lambda: MINUTE)
    reloader = await primed(policy_file, guard)
    text = policy_file.read_text()
    policy_file.unlink()
    assert not await reloader.reload_now()
    assert guard.reload_error == f"{policy_file}: cannot read: No such file or directory"
    policy_file.write_text(text)
    assert await reloader.reload_now()
    assert guard.reload_error is None


async def test_replace_policy_drops_cached_route_plans() -> None:
    guard = Guard(parse_policy(policy_text()), clock=lambda: MINUTE)
    await guard.tenants.upsert("acme", plan="pro")
    assert (await guard.check("acme", "GET", "/reports/1")).limit == 50
    assert (await guard.check("other", "GET", "/reports/1")).limit == 5

    # pro is gone: acme falls back to the default plan at once (same counter, new limit)
    without_pro = policy_text(limit=6).replace("  - {name: pro, enforcement: soft}\n", "")
    guard.replace_policy(parse_policy(without_pro.replace(", pro: 50", "")))
    acme = await guard.check("acme", "GET", "/reports/1")
    assert (acme.plan, acme.limit, acme.remaining) == ("free", 6, 4)
    other = await guard.check("other", "GET", "/reports/1")
    assert (other.limit, other.remaining) == (6, 4)


async def test_the_task_polls_every_interval_until_stopped(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = Guard(load_policy(policy_file), clock=lambda: MINUTE)
    polled = asyncio.Event()
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        polled.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr("tenantguard.reload.sleep", pause)
    policy_file.write_text(policy_text(limit=9))
    async with PolicyReloader(guard, policy_file, interval=7.0) as reloader:
        await polled.wait()
        assert (await guard.check("acme", "GET", "/reports/1")).limit == 9
    assert pauses == [7.0]
    assert reloader._task is None


def test_interval_must_be_positive(policy_file: Path) -> None:
    guard = Guard(load_policy(policy_file))
    with pytest.raises(ValueError, match="interval must be > 0"):
        PolicyReloader(guard, policy_file, interval=0)


async def test_around_polls_for_the_lifespan_of_an_asgi_app(
    policy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = Guard(load_policy(policy_file), clock=lambda: MINUTE)
    polled = asyncio.Event()

    async def pause(seconds: float) -> None:
        polled.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr("tenantguard.reload.sleep", pause)
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            events.append("http")
            return
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def send(message: Message) -> None:
        events.append(message["type"])

    async def receive() -> Message:
        return await inbox.get()

    reloader = PolicyReloader(guard, policy_file)
    wrapped = reloader.around(app)
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    await wrapped({"type": "http"}, receive, send)
    assert reloader._task is None  # requests start nothing

    async def serve() -> None:
        await wrapped({"type": "lifespan"}, receive, send)

    lifespan = asyncio.create_task(serve())
    policy_file.write_text(policy_text(limit=9))
    await inbox.put({"type": "lifespan.startup"})
    await polled.wait()
    assert (await guard.check("acme", "GET", "/reports/1")).limit == 9
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan
    assert reloader._task is None
    assert events == [
        "http",
        "lifespan.startup",
        "lifespan.startup.complete",
        "lifespan.shutdown",
        "lifespan.shutdown.complete",
    ]


async def test_a_reloaded_event_retention_applies_to_the_next_purge(policy_file: Path) -> None:
    guard = Guard(load_policy(policy_file), clock=lambda: MINUTE)
    reloader = await primed(policy_file, guard)
    assert guard.events.retention == 14 * 86400
    policy_file.write_text(policy_text() + "events: {retention: 2d}\n")
    assert await reloader.reload_now()
    assert guard.events.retention == 2 * 86400
    await guard.close()
