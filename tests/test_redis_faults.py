"""Redis failures: killed, restarted empty, or up but too slow to answer in time.

DESIGN.md, "Reliable": with Redis down a check fails open or closed per the policy's
``on_store_error``, within one store timeout, never raising; a circuit breaker then
answers without waiting at all; after Redis returns, one probe closes the breaker and
counting is exact again. The breaker's clock and the guard's clock are injected, so the
cooldown and the rate windows advance without sleeping. Only a socket timeout is real
time: those checks are bounded from above, generously, and never from below.

These tests kill and restart their own ``redis-server`` (on a fixed port, so the store's
URL stays valid), not the session's shared one: a failure halfway through must not leave
other tests without a server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import REGISTRY

from servers import RedisServer, require_redis
from tenantguard import Guard, parse_policy
from tenantguard.decision import Decision
from tenantguard.stores._breaker import CircuitBreaker
from tenantguard.stores.redis_store import EAGER, MIN_CONNECTIONS, RedisCounters

MINUTE = 1_700_000_040.0  # a whole minute since the epoch
TIMEOUT = 0.25
MARGIN = 0.5  # scheduling slack on a busy machine; bounds are upper bounds only
COOLDOWN = 0.5
LIMIT = 5
CALLERS = 4

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
on_store_error: MODE
rate_limits:
  - name: api
    match: {paths: ["/api/**"]}
    window: 1m
    limits: {default: LIMIT}
  - name: stream
    match: {paths: ["/stream"]}
    window: 1m
    limits: {default: 100000}
  - name: export
    match: {paths: ["/export"]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 2}
"""


class Clock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    require_redis()
    with RedisServer() as redis_server:
        yield redis_server


@pytest.fixture
def url(server: RedisServer) -> str:
    """The module's server, running (a failed test may have left it killed) and empty."""
    if not server.running:
        server.start()
    with server.client() as client:
        client.flushall()
        client.script_flush()
    return server.url + f"?timeout={TIMEOUT}&clock=local"


class Rig:
    def __init__(self, url: str, mode: str, *, timeout: float = TIMEOUT) -> None:
        self.clock = Clock(MINUTE)
        self.breaker_clock = Clock(0.0)
        self.breaker = CircuitBreaker(failures=3, cooldown=COOLDOWN, clock=self.breaker_clock)
        self.store = RedisCounters.from_url(
            url.replace(f"timeout={TIMEOUT}", f"timeout={timeout}"), breaker=self.breaker
        )
        policy = POLICY.replace("MODE", mode).replace("LIMIT", str(LIMIT))
        self.guard = Guard(parse_policy(policy), counters=self.store, clock=self.clock)

    async def timed(self, path: str, tenant: str = "acme") -> tuple[Decision, float]:
        started = time.perf_counter()
        decision = await self.guard.check(tenant, "GET", path)
        return decision, time.perf_counter() - started


@pytest.fixture(params=["allow", "deny"])
async def rig(request: pytest.FixtureRequest, url: str) -> AsyncIterator[Rig]:
    rig = Rig(url, request.param)
    try:
        yield rig
    finally:
        await rig.guard.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_mode(decision: Decision, mode: str) -> None:
    assert decision.degraded, decision.reason
    if mode == "allow":
        assert (decision.allowed, decision.status, decision.retry_after) == (True, 200, None)
    else:
        assert (decision.allowed, decision.status, decision.retry_after) == (False, 429, 1)
    assert decision.reason is not None
    assert f"on_store_error: {mode}" in decision.reason


def mode_of(rig: Rig) -> str:
    return rig.guard.policy.document.on_store_error


# -- the circuit breaker alone --------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock(100.0)
    breaker = CircuitBreaker(failures=3, cooldown=0.5, clock=clock)
    assert breaker.state == "closed"
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive: starts again
    breaker.failure()
    breaker.failure()
    assert (breaker.state, breaker.allow()) == ("closed", True)
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now += 0.49
    assert not breaker.allow()
    clock.now += 0.01
    assert breaker.allow()  # the probe
    assert breaker.state == "half-open"
    assert not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open for another cooldown from now
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.allow()
    breaker.failure()  # a fresh count: one failure does not reopen
    assert breaker.state == "closed"


def test_breaker_abandoned_probe_does_not_wedge_it() -> None:
    clock = Clock(0.0)
    breaker = CircuitBreaker(failures=1, cooldown=0.5, clock=clock)
    breaker.failure()
    clock.now = 0.5
    assert breaker.allow()
    # the probe never reports back (its task was cancelled): after another cooldown
    # the breaker lets a new probe through instead of refusing forever
    clock.now = 1.0
    assert breaker.allow()


# -- Redis killed, then restarted -----------------------------------------------------------


async def test_kill_during_stream_then_restart(server: RedisServer, rig: Rig) -> None:
    mode = mode_of(rig)
    errors_before = sum(
        sample("tenantguard_store_errors_total", store="redis", kind=kind)
        for kind in ("timeout", "ConnectionError", "circuit_open")
    )
    degraded_before = sample("tenantguard_degraded_decisions_total", mode=mode)
    # (started after the kill, finished before it, decision, seconds it took)
    results: list[tuple[bool, bool, Decision, float]] = []
    killed = asyncio.Event()
    checks_per_caller = 12

    async def caller() -> None:
        for _ in range(checks_per_caller):
            after_kill = killed.is_set()
            decision, elapsed = await rig.timed("/stream")
            results.append((after_kill, not killed.is_set(), decision, elapsed))

    async def killer() -> None:
        while len(results) < CALLERS * 3:
            await asyncio.sleep(0)
        server.kill()
        killed.set()

    outcome = await asyncio.gather(
        *(caller() for _ in range(CALLERS)), killer(), return_exceptions=True
    )
    assert [r for r in outcome if r is not None] == []  # no caller saw an exception

    before = [d for _, finished_before, d, _ in results if finished_before]
    during = [(d, elapsed) for after, _, d, elapsed in results if after]
    in_flight = [d for after, finished_before, d, _ in results if not (after or finished_before)]
    assert len(before) >= CALLERS * 3
    assert all(d.allowed and not d.degraded for d in before)
    assert len(during) >= CALLERS * 6
    for decision, elapsed in during:
        assert_mode(decision, mode)
        assert elapsed < TIMEOUT + MARGIN
    for decision in in_flight:  # answered by Redis just in time, or degraded
        if decision.degraded:
            assert_mode(decision, mode)
        else:
            assert decision.allowed
    assert rig.breaker.state == "open"

    # open: answered at once, not one timeout each
    started = time.perf_counter()
    for _ in range(50):
        decision, _ = await rig.timed("/stream")
        assert_mode(decision, mode)
    assert time.perf_counter() - started < 50 * TIMEOUT / 10

    errors_after = sum(
        sample("tenantguard_store_errors_total", store="redis", kind=kind)
        for kind in ("timeout", "ConnectionError", "circuit_open")
    )
    assert errors_after - errors_before >= 50
    degraded = sample("tenantguard_degraded_decisions_total", mode=mode) - degraded_before
    assert degraded == sum(d.degraded for _, _, d, _ in results) + 50

    # Redis returns, empty and without the script; the cooldown passes (injected)
    server.start()
    returned = time.perf_counter()
    rig.breaker_clock.now += COOLDOWN
    rig.clock.now += 60  # a fresh window: nothing of the old counts survives either way
    probe, _ = await rig.timed("/api/items")  # the probe: NOSCRIPT, reload, resend
    rest = await asyncio.gather(*(rig.timed("/api/items") for _ in range(LIMIT + 4)))
    back = time.perf_counter() - returned
    decisions = [probe, *(d for d, _ in rest)]
    assert [d.degraded for d in decisions] == [False] * (LIMIT + 5)
    assert sum(d.allowed for d in decisions) == LIMIT
    assert [d.status for d in decisions].count(429) == 5
    assert rig.breaker.state == "closed"
    assert back < 1.0


async def test_failed_probe_reopens_without_waiting_again(server: RedisServer, rig: Rig) -> None:
    mode = mode_of(rig)
    assert not (await rig.guard.check("acme", "GET", "/stream")).degraded
    server.kill()
    for _ in range(3):
        decision, elapsed = await rig.timed("/stream")
        assert_mode(decision, mode)
        assert elapsed < TIMEOUT + MARGIN
    assert rig.breaker.state == "open"
    rig.breaker_clock.now += COOLDOWN
    probes = await asyncio.gather(*(rig.timed("/stream") for _ in range(10)))
    for decision, elapsed in probes:  # one probe waits, the others are refused at once
        assert_mode(decision, mode)
        assert elapsed < TIMEOUT + MARGIN
    assert rig.breaker.state == "open"
    started = time.perf_counter()
    for _ in range(50):
        assert_mode((await rig.timed("/stream"))[0], mode)
    assert time.perf_counter() - started < 50 * TIMEOUT / 10


async def test_release_during_outage_does_not_raise(server: RedisServer, rig: Rig) -> None:
    decision = await rig.guard.check("acme", "GET", "/export")
    assert decision.allowed
    assert not decision.degraded
    assert decision.lease is not None
    server.kill()
    for _ in range(4):  # timeouts first, then the open breaker
        started = time.perf_counter()
        await rig.guard.release(decision.lease)
        assert time.perf_counter() - started < TIMEOUT + MARGIN
    assert rig.breaker.state == "open"
    assert_mode(await rig.guard.check("acme", "GET", "/export"), mode_of(rig))


# -- Redis up but slow ----------------------------------------------------------------------


async def test_stalled_redis_opens_the_breaker_after_timeouts(
    server: RedisServer, rig: Rig
) -> None:
    """A hung server (a partition, a stopped host) costs one timeout per check only until
    the breaker opens; then checks are answered at once, and one probe restores it."""
    mode = mode_of(rig)
    assert not (await rig.guard.check("acme", "GET", "/stream")).degraded
    timeouts = sample("tenantguard_store_errors_total", store="redis", kind="timeout")
    with server.client() as other:
        other.execute_command("CLIENT", "PAUSE", "1500")
        for _ in range(3):
            decision, elapsed = await rig.timed("/stream")
            assert_mode(decision, mode)
            assert elapsed < TIMEOUT + MARGIN
        assert rig.breaker.state == "open"
        assert sample("tenantguard_store_errors_total", store="redis", kind="timeout") == (
            timeouts + 3
        )
        started = time.perf_counter()
        decisions = [await rig.guard.check("acme", "GET", "/stream") for _ in range(50)]
        assert time.perf_counter() - started < 50 * TIMEOUT / 10
        for decision in decisions:
            assert_mode(decision, mode)
        await asyncio.to_thread(other.ping)  # answered once the pause is over
    rig.breaker_clock.now += COOLDOWN
    rig.clock.now += 60  # the paused calls may still have run late: count a fresh window
    decisions = [await rig.guard.check("acme", "GET", "/api/items") for _ in range(LIMIT + 5)]
    assert [d.degraded for d in decisions] == [False] * (LIMIT + 5)
    assert [d.allowed for d in decisions] == [True] * LIMIT + [False] * 5
    assert rig.breaker.state == "closed"


async def test_a_cancelled_batch_still_answers_its_callers(server: RedisServer, url: str) -> None:
    """Cancelling the task that sends a batch (a shutting-down loop, say) must neither
    hang the checks waiting on it nor leave the breaker without a verdict."""
    rig = Rig(url, "deny", timeout=5.0)
    try:
        assert not (await rig.guard.check("acme", "GET", "/stream")).degraded
        with server.client() as other:
            other.execute_command("CLIENT", "PAUSE", "500")
            checks = asyncio.gather(*(rig.timed("/stream") for _ in range(3)))
            sending: list[asyncio.Task[None]] = []
            while not sending:
                await asyncio.sleep(0)
                sending = [task for task in rig.store._tasks if not task.done()]
            for task in sending:
                task.cancel()
            for decision, elapsed in await asyncio.wait_for(checks, 2.0):
                assert_mode(decision, "deny")
                assert elapsed < 2.0
            assert rig.breaker._failures == 1
            await asyncio.to_thread(other.ping)
    finally:
        await rig.guard.close()


@pytest.mark.parametrize("mode", ["allow", "deny"])
async def test_slow_redis_degrades_within_the_timeout(
    server: RedisServer, url: str, mode: str
) -> None:
    rig = Rig(url, mode, timeout=0.2)
    try:
        assert not (await rig.guard.check("acme", "GET", "/api/items")).degraded
        errors = sample("tenantguard_store_errors_total", store="redis", kind="timeout")
        with server.client() as other:
            # every other client's commands wait until the pause ends; it has begun
            # when this returns, so the check below is sure to meet it
            other.execute_command("CLIENT", "PAUSE", "600")
            decision, elapsed = await rig.timed("/api/items")
            assert_mode(decision, mode)
            assert elapsed < 0.2 + MARGIN
            assert sample("tenantguard_store_errors_total", store="redis", kind="timeout") > errors
            await asyncio.to_thread(other.ping)  # answered once the pause is over
        # one timeout does not open the breaker; the connection that timed out was
        # dropped, so no late reply is read as the answer to a later call
        assert rig.breaker.state == "closed"
        decisions = [await rig.guard.check("acme", "GET", "/api/items") for _ in range(LIMIT)]
        assert [d.degraded for d in decisions] == [False] * LIMIT
        # 1 counted before, the slow one was not (or was, if Redis ran it after waking):
        # either way the window holds at most LIMIT and the last answers are exact
        assert [d.allowed for d in decisions].count(True) in (LIMIT - 1, LIMIT - 2)
        assert not decisions[-1].allowed
    finally:
        await rig.guard.close()


async def test_a_read_only_replica_counts_as_an_outage(server: RedisServer, url: str) -> None:
    """A server that answers but cannot write (a replica after a failover went wrong)
    opens the breaker like a dead one: its errors are not successes."""
    with RedisServer(extra_args=["--replicaof", "127.0.0.1", str(server.port)]) as replica:
        replica_url = replica.url + f"?timeout={TIMEOUT}&clock=local"
        rig = Rig(replica_url, "allow")
        try:
            decisions = [await rig.guard.check("acme", "GET", "/api/x") for _ in range(5)]
            # and the connection that reached it was dropped, so that the next one asks
            # Sentinel (or DNS) where the master is now
            lanes = [lane for lane in rig.store._lanes if lane is not None]
            assert lanes, "a connection was used"
            assert not any(lane.is_connected for lane in lanes)
        finally:
            await rig.guard.close()
    assert all(decision.degraded and decision.allowed for decision in decisions)
    assert rig.breaker.state == "open"


async def test_a_master_demoted_after_loading_drops_its_connections(
    server: RedisServer, url: str
) -> None:
    """A master that becomes a replica (a failover behind DNS) refuses the whole call of
    a function that writes: that is an outage, and the connection is dropped so the next
    one can find the new master."""
    rig = Rig(url, "allow")
    try:
        assert not (await rig.guard.check("acme", "GET", "/api/x")).degraded
        with RedisServer() as other, server.client() as client:
            client.replicaof("127.0.0.1", other.port)
            try:
                decision = await rig.guard.check("acme", "GET", "/api/x")
                assert decision.degraded
                assert decision.allowed
                lanes = [lane for lane in rig.store._lanes if lane is not None]
                assert lanes, "a connection was used"
                assert not any(lane.is_connected for lane in lanes)
            finally:
                client.replicaof("no", "one")
    finally:
        await rig.guard.close()


async def test_a_release_runs_when_redis_is_out_of_memory(server: RedisServer, url: str) -> None:
    """With maxmemory reached and noeviction, new counts are refused (degraded), but a
    release only gives back, so it still frees its lease."""
    rig = Rig(url, "deny")
    try:
        held = [await rig.guard.check("acme", "GET", "/export") for _ in range(2)]
        assert [d.allowed for d in held] == [True, True]
        assert not (await rig.guard.check("acme", "GET", "/export")).allowed
        with server.client() as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", "1")
            try:
                refused = await rig.guard.check("acme", "GET", "/export")
                assert refused.degraded
                assert not refused.allowed
                await rig.guard.release(held[0].lease)
            finally:
                client.config_set("maxmemory", "0")
        after = await rig.guard.check("acme", "GET", "/export")
        assert after.allowed
        assert not after.degraded
    finally:
        await rig.guard.close()


async def test_a_restarted_redis_is_counted_on_at_the_first_check(
    server: RedisServer, url: str
) -> None:
    """The server closed the store's connections when it stopped: the next checks find
    that out before sending, and count on new connections instead of failing, even
    when they come before the loop has read the connections' end."""
    rig = Rig(url, "deny")
    try:
        first = [rig.guard.check("acme", "GET", "/api/x") for _ in range(2 * EAGER)]
        assert not any(decision.degraded for decision in await asyncio.gather(*first))
        for restart in range(3):  # each restart forgets the function, and every connection
            server.stop()
            server.start()
            decisions = await asyncio.gather(
                *(rig.guard.check(f"t{i}", "GET", "/api/x") for i in range(2 * EAGER))
            )
            assert not any(d.degraded for d in decisions), (restart, decisions[0].reason)
            # a fresh server: these are its first counts
            assert {decision.remaining for decision in decisions} == {LIMIT - 1}
    finally:
        await rig.guard.close()


async def test_a_refused_login_says_why_and_the_log_says_when_the_circuit_opens(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Once per outage: the probes that fail after it (one per cooldown) open the circuit
    again without a word, and the checks it refuses say what the last failure was."""
    with server.client() as client:
        client.acl_setuser("tg", enabled=True, passwords=["+right"], commands=["+@all"])
    wrong = server.url.replace("redis://", "redis://tg:wrong@") + "?clock=local"
    rig = Rig(wrong + f"&timeout={TIMEOUT}", "allow")
    try:
        with caplog.at_level(logging.WARNING, logger="tenantguard.redis"):
            decisions = [await rig.guard.check("acme", "GET", "/api/x") for _ in range(4)]
            for _ in range(3):  # probes, each failing
                rig.breaker_clock.now += COOLDOWN
                decisions.append(await rig.guard.check("acme", "GET", "/api/x"))
    finally:
        await rig.guard.close()
        with server.client() as client:
            client.acl_deluser("tg")
    assert all(decision.degraded for decision in decisions)
    assert "AuthenticationError" in str(decisions[0].reason), decisions[0].reason
    # the fourth was refused by the open circuit, which names the last failure
    assert "circuit is open" in str(decisions[3].reason), decisions[3].reason
    assert "AuthenticationError" in str(decisions[3].reason), decisions[3].reason
    opened = [r.getMessage() for r in caplog.records if "circuit open" in r.getMessage()]
    assert len(opened) == 1, caplog.records
    assert "AuthenticationError" in opened[0]


def test_an_unknown_url_option_is_refused_by_name() -> None:
    for url in ("redis://127.0.0.1:1/0?timout=1", "redis+cluster://127.0.0.1:1/?timout=1"):
        with pytest.raises(ValueError, match="timout: not an option of a Redis URL"):
            RedisCounters.from_url(url)


def test_too_few_connections_are_refused_with_the_number_needed() -> None:
    """The store keeps connections for its batches and may need more at once (replacing
    a dropped one, a health check): a smaller pool would fail checks, so it is refused
    at start-up."""
    too_few = MIN_CONNECTIONS - 1
    with pytest.raises(
        ValueError, match=rf"max_connections={too_few}: .* at least {MIN_CONNECTIONS}"
    ):
        RedisCounters.from_url(f"redis://127.0.0.1:1/0?max_connections={too_few}")
    RedisCounters.from_url(f"redis://127.0.0.1:1/0?max_connections={MIN_CONNECTIONS}")


async def test_a_reload_after_a_restart_fits_in_the_smallest_pool_allowed(
    server: RedisServer,
) -> None:
    """After the server forgot the function, every batch in flight loads it again while
    the store keeps its batch connections: the smallest pool allowed still answers."""
    rig = Rig(f"{server.url}?clock=local&timeout=5&max_connections={MIN_CONNECTIONS}", "deny")
    try:
        for round_ in range(4):
            if round_ % 2:
                server.stop()
                server.start()
            else:
                with server.client() as client:
                    client.function_flush()
            checks = [rig.guard.check(f"t{i}", "GET", "/api/x") for i in range(40)]
            # health checks meanwhile, overlapping: they share one connection
            pings = [rig.store.ping() for _ in range(5)]
            decisions = await asyncio.gather(*checks)
            assert not any(decision.degraded for decision in decisions), decisions[0].reason
            assert await asyncio.gather(*pings) == [True] * 5
    finally:
        await rig.guard.close()


async def test_a_health_check_after_a_restart_says_redis_is_up(server: RedisServer) -> None:
    """The pooled connection of the last health check was closed by the restart: the
    next one finds that out and asks on a new connection, rather than saying "down"
    while checks count normally."""
    rig = Rig(f"{server.url}?clock=local&timeout=5", "deny")
    try:
        assert await rig.store.ping()
        for _ in range(3):
            server.stop()
            server.start()
            assert await rig.store.ping()
    finally:
        await rig.guard.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis:/127.0.0.1:6390", r"no host in the redis:// URL \(its path is '/127.0"),
        ("redis:///0", r"no host .*; expected redis://host:port/"),
        ("redis+sentinel:///mymaster", r"no host in the redis\+sentinel:// URL"),
        ("redis://127.0.0.1:6390/abc", r"/abc: a Redis database is a number"),
        ("redis://127.0.0.1:6390/²", r"/²: a Redis database is a number"),
        ("redis+cluster://127.0.0.1:7000/abc", r"/abc: a Redis database is a number"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/abc", r"/abc: a Redis database"),
        ("unix://var/run/redis.sock", r"a socket's path goes after three slashes"),
        (
            "redis://127.0.0.1:6390/0?ssl_cert_reqs=none",
            r"ssl_cert_reqs: a TLS option, for rediss://",
        ),
        ("unix://", r"a socket's path goes after three slashes"),
    ],
)
def test_an_address_redis_py_would_read_as_another_is_refused(url: str, message: str) -> None:
    """redis-py reads a URL without a host as the default server and a database that is
    not a number as database 0: counters would go somewhere else than meant."""
    with pytest.raises(ValueError, match=message):
        RedisCounters.from_url(url)
