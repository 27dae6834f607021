"""``RedisCounters`` against real servers: key layout and hash tags, TTLs, script reloads,
auto-pipelining, the server clock, cross-slot decisions, Sentinel, URLs.

Everything runs against the session's ``redis-server`` processes (``conftest.py``); no
mocks. Time is injected (``?clock=local``) except where the server clock is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import unquote

import pytest
import redis
from redis.asyncio.connection import SSLConnection

from servers import RedisCluster, RedisSentinel, RedisServer
from tenantguard import Decision, Guard, RuleCheck, parse_policy
from tenantguard.errors import StoreError
from tenantguard.stores import CounterSpec, open_counters
from tenantguard.stores._redis_conn import open_writer
from tenantguard.stores._redis_records import layout, record_head
from tenantguard.stores.redis_store import (
    EAGER,
    MAX_BATCH,
    SPLIT,
    RedisCounters,
    counter_key,
)

T = 1_700_000_040.0  # an exact minute since the epoch, 840 s into its hour
OPTIONS = "?clock=local&timeout=5"


class Clock:
    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Target(NamedTuple):
    """One backend: the counter-store URL and sync clients for every master."""

    name: str
    url: str
    nodes: list[RedisServer]

    @contextmanager
    def clients(self) -> Iterator[list[redis.Redis]]:
        clients = [node.client() for node in self.nodes]
        try:
            yield clients
        finally:
            for client in clients:
                client.close()

    def scan(self) -> dict[str, int]:
        """Every key on every master → the index of the node that holds it."""
        found: dict[str, int] = {}
        with self.clients() as clients:
            for index, client in enumerate(clients):
                for key in client.scan_iter(count=1000):
                    assert key not in found, f"{key!r} on two nodes"
                    found[key] = index
        return found

    def store(self, options: str = OPTIONS) -> RedisCounters:
        return RedisCounters.from_url(self.url + options)


def single_target(redis_server: RedisServer, redis_url: str) -> Target:
    return Target("redis", redis_url, [redis_server])


def cluster_target(redis_cluster: RedisCluster, redis_cluster_url: str) -> Target:
    url = redis_cluster_url.replace("redis://", "redis+cluster://", 1)
    return Target("cluster", url, list(redis_cluster.nodes))


@pytest.fixture
def single(redis_server: RedisServer, redis_url: str) -> Target:
    return single_target(redis_server, redis_url)


@pytest.fixture
def cluster(redis_cluster: RedisCluster, redis_cluster_url: str) -> Target:
    return cluster_target(redis_cluster, redis_cluster_url)


@pytest.fixture(params=["redis", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """The single Redis or the cluster, emptied for this test."""
    if request.param == "redis":
        return single_target(
            request.getfixturevalue("redis_server"), request.getfixturevalue("redis_url")
        )
    return cluster_target(
        request.getfixturevalue("redis_cluster"), request.getfixturevalue("redis_cluster_url")
    )


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: between the first ``{`` and the next ``}``."""
    start = key.index("{")
    end = key.index("}", start + 1)
    assert end > start + 1, f"{key!r}: empty hash tag, the whole key would be hashed"
    return key[start + 1 : end]


def table_of(key: str) -> str:
    """The rule table (``name|algorithm|window``) a ``tg:{tag}:table[:key]`` key belongs to."""
    rest = key[key.index("}") + 2 :]
    return unquote(rest.split(":", 1)[0])


def keyslot(client: redis.Redis, key: str) -> int:
    return int(client.cluster("KEYSLOT", key))


def check_of(decision: Decision, rule: str) -> RuleCheck:
    return next(check for check in decision.checks if check.rule == rule)


# --- 1. tenant ids cannot escape their hash tag ----------------------------------------

ESCAPE_POLICY = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
rate_limits:
  - name: endpoint
    match: {paths: ["/api/**"]}
    window: 1m
    limits: {default: 5}
  - name: sliding
    group: sliding
    match: {paths: ["/**"]}
    algorithm: sliding-window
    window: 1m
    limits: {default: 50}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 50}
  - name: per-client
    group: client
    match: {paths: ["/**"]}
    per: [tenant, client]
    algorithm: gcra
    window: 10s
    limits: {default: 50}
  - name: parallel
    group: parallel
    match: {paths: ["/**"]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 50}
"""
CLIENTS = ("c1", "c}{:2")
# the tenant's hash (its four tenant-wide counters), and per-client keys once per client
KEYS_PER_TENANT = 1 + len(CLIENTS)
TENANT_WIDE = {"endpoint", "sliding", "tenant-bucket", "parallel"}

ESCAPING_TENANTS = [
    "a}b",
    "{x}",
    "}{",
    "{",
    "}",
    "a:b:c",
    "tg:{a}:endpoint",
    "*",
    "a b",
    "租户",
    "🚀tenant🚀",
    "x" * 1024,
    "-",
    "%7Bx%7D",  # what a percent-encoded "{x}" looks like: must not meet "{x}"
    "a",
    "a}:x",
]


async def test_every_tenant_keeps_all_its_keys_in_its_own_slot(cluster: Target) -> None:
    guard = Guard(parse_policy(ESCAPE_POLICY), counters=cluster.store(), clock=Clock())
    async with guard:
        for tenant in ESCAPING_TENANTS:
            for client in CLIENTS:
                decision = await guard.check(tenant, "GET", "/api/x", client=client)
                assert decision.allowed, (tenant, decision.reason)
                assert not decision.degraded, (tenant, decision.reason)
                assert len(decision.checks) == 5

    by_tenant: dict[str, list[str]] = {}
    for key in cluster.scan():
        tenant = unquote(hash_tag(key))
        assert tenant in ESCAPING_TENANTS, f"{key!r} decodes to no tenant: {tenant!r}"
        by_tenant.setdefault(tenant, []).append(key)
    # every key is some tenant's, and no key is shared: the counts add up exactly
    assert {t: len(keys) for t, keys in by_tenant.items()} == dict.fromkeys(
        ESCAPING_TENANTS, KEYS_PER_TENANT
    )

    found = cluster.scan()
    with cluster.clients() as clients:
        for tenant, keys in by_tenant.items():
            # the tenant's own counters are the fields of one hash, named by their rule
            (hashed,) = [key for key in keys if clients[found[key]].type(key) == "hash"]
            fields = clients[found[hashed]].hkeys(hashed)
            assert {unquote(f).split("|")[0] for f in fields} == {*TENANT_WIDE, ":ttl"}
            assert {table_of(key).split("|")[0] for key in keys if key != hashed} == {"per-client"}
            tag = hash_tag(keys[0])
            assert "{" not in tag, tag
            assert "}" not in tag, tag
            slots = {keyslot(clients[0], key) for key in keys}
            assert slots == {keyslot(clients[0], "{" + tag + "}")}, (tenant, keys, slots)


async def test_a_tenant_named_like_another_tenants_key_shares_no_counter(cluster: Target) -> None:
    guard = Guard(parse_policy(ESCAPE_POLICY), counters=cluster.store(), clock=Clock())
    async with guard:
        for _ in range(5):
            assert (await guard.check("a}:x", "GET", "/api/x", client="c1")).allowed
        full = await guard.check("a}:x", "GET", "/api/x", client="c1")
        assert (full.allowed, full.rule, full.remaining) == (False, "endpoint", 0)

        other = await guard.check("a", "GET", "/api/x", client="c1")
        assert other.allowed
        assert check_of(other, "endpoint").remaining == 4
        # and the other way round: filling "a" leaves "a}:x" exactly where it was
        for _ in range(4):
            assert (await guard.check("a", "GET", "/api/x", client="c1")).allowed
        assert not (await guard.check("a", "GET", "/api/x", client="c1")).allowed
        again = await guard.check("a}:x", "GET", "/api/x", client="c1")
        assert (again.allowed, again.remaining) == (False, 0)
        assert check_of(again, "per-client").remaining == 45  # 5 of 50 used, denials uncounted


# --- 2. every key expires --------------------------------------------------------------

TTL_POLICY = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
rate_limits:
  - name: fw
    match: {paths: ["/**"]}
    window: 1m
    limits: {default: 4}
  - name: sw
    group: sw
    match: {paths: ["/**"]}
    algorithm: sliding-window
    window: 1m
    limits: {default: 6}
  - name: tb
    group: tb
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 10}
    burst: {default: 20}
  - name: gc
    group: gc
    match: {paths: ["/**"]}
    per: [tenant, client]
    algorithm: gcra
    window: 1m
    limits: {default: 5}
    burst: {default: 3}
  - name: cc
    group: cc
    match: {paths: ["/**"]}
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 3}
"""
HORIZON = 10.0  # seconds a tenant hash's TTL may run past its counters' (counters.lua)
# the longest a state can matter, in seconds: window, two windows, burst / rate, lease ttl
LIFETIME = {"fw": 60.0, "sw": 120.0, "tb": 20 / (10 / 10), "gc": 3 * (60 / 5), "cc": 30.0}


async def test_every_key_has_a_ttl_within_its_state_lifetime(target: Target) -> None:
    clock = Clock(T + 7.25)
    guard = Guard(parse_policy(TTL_POLICY), counters=target.store(), clock=clock)
    leases: list[str] = []
    async with guard:
        for step in range(40):
            clock.now = T + 7.25 + step * 1.5
            tenant = f"t{step % 5}"
            decision = await guard.check(tenant, "GET", "/x", client=f"c{step % 3}", cost=1)
            assert not decision.degraded, decision.reason
            if decision.lease is not None:
                leases.append(decision.lease)
            if step % 4 == 3 and leases:
                await guard.release(leases.pop(0))
        # a denial and an all-expired release on the way: neither may leave a key behind
        clock.now += 200
        for lease in leases:
            await guard.release(lease)
        assert (await guard.check("t0", "GET", "/x", client="c0")).allowed

    keys = target.scan()
    seen: set[str] = set()
    with target.clients() as clients:
        for key, node in keys.items():
            client = clients[node]
            if client.type(key) == "hash":
                # a tenant's own counters: the hash lives as long as its longest-lived
                # counter needs, and at most HORIZON (counters.lua) past that
                rules = {unquote(f).split("|")[0] for f in client.hkeys(key)} - {":ttl"}
                limit = max(LIFETIME[rule] for rule in rules) + 1.0 + HORIZON
            else:
                rules = {table_of(key).split("|")[0]}
                limit = LIFETIME[table_of(key).split("|")[0]] + 1.0
            seen |= rules
            pttl = client.pttl(key)
            assert 0 < pttl <= limit * 1000, f"{key!r}: PTTL {pttl} ms, lifetime {limit} s"
    assert seen == set(LIFETIME)


# --- 3. a flushed script is loaded again -----------------------------------------------


def _without_functions(target: Target) -> str:
    """The target's URL as a user who may not load Redis functions (as on Redis 6): the
    store then runs the counters as a script."""
    with target.clients() as clients:
        for client in clients:
            client.acl_setuser(
                "nofunc", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                commands=["+@all", "-function"], reset=True,
            )  # fmt: skip
    scheme, rest = target.url.split("://", 1)
    return f"{scheme}://nofunc:pw@{rest}"


@pytest.mark.parametrize("mode", ["function", "script"])
async def test_flushed_counters_are_loaded_again(target: Target, mode: str) -> None:
    """The counters run as a Redis function, or as a script for a user who may not load
    one; either way a server that forgot them (a restart without persistence, a flush)
    gets them again, on every node, and no check notices."""
    policy = parse_policy(ESCAPE_POLICY)
    url = target.url if mode == "function" else _without_functions(target)
    store = RedisCounters.from_url(url + OPTIONS)
    tenants = [f"tenant-{i}" for i in range(12)]  # spread over every cluster node
    async with Guard(policy, counters=store, clock=Clock()) as guard:
        for tenant in tenants:
            first = await guard.check(tenant, "GET", "/api/x", client="c1")
            assert (first.allowed, first.degraded, first.remaining) == (True, False, 4)
        assert store._command is not None
        assert store._command[0] == ("FCALL" if mode == "function" else "EVALSHA")
        with target.clients() as clients:
            for client in clients:
                client.script_flush()
                client.function_flush()
        for tenant in tenants:
            second = await guard.check(tenant, "GET", "/api/x", client="c1")
            assert (second.allowed, second.degraded, second.remaining) == (True, False, 3)
        third = await asyncio.gather(
            *(guard.check(tenant, "GET", "/api/x", client="c1") for tenant in tenants)
        )
        assert [(d.allowed, d.degraded, d.remaining) for d in third] == [(True, False, 2)] * 12
    # every node held some of these keys, so every node had to load the counters again
    assert set(target.scan().values()) == set(range(len(target.nodes)))
    with target.clients() as clients:
        for client in clients:
            client.acl_deluser("nofunc")


# --- 4. concurrent calls share script calls ---------------------------------------------


def record_writes(store: RedisCounters) -> list[list[int]]:
    """Every write ``store`` makes from now on: the records of each script call in it
    (on a cluster, a write per node)."""
    writes: list[list[int]] = []
    original = store._packed

    def packed(batch: list[Any], groups: list[list[int]]) -> bytes:
        writes.append([len(group) for group in groups])
        return original(batch, groups)

    store._packed = packed  # type: ignore[method-assign]
    return writes


async def test_concurrent_applies_are_batched(target: Target) -> None:
    store = target.store()
    sends = record_writes(store)
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 15, 15, True)
    tenants = [f"t{i % 10}" for i in range(200)]
    try:
        outcomes = await asyncio.gather(
            *(store.apply([spec], [tenant], 1, None, T, tenant) for tenant in tenants)
        )
    finally:
        await store.close()
    assert sum(map(sum, sends)) == 200
    calls = [size for trip in sends for size in trip]
    if len(target.nodes) == 1:
        # the first EAGER calls of the turn go out at once, while a slot is free; the
        # rest wait for one and then go out together: one script call per batch
        assert sorted(calls) == [EAGER] * SPLIT + [200 - EAGER * SPLIT], calls
    else:
        # per batch, one trip per node and one script call per hash slot
        assert len(sends) <= (SPLIT + 1) * len(target.nodes), sends
        assert len(calls) <= (SPLIT + 1) * 10, calls
    for name in {f"t{i}" for i in range(10)}:
        mine = [out[0] for tenant, out in zip(tenants, outcomes, strict=True) if tenant == name]
        assert sum(allowed for allowed, *_ in mine) == 15, name
        remaining = sorted(left for allowed, _, left, _, _ in mine if allowed)
        assert remaining == list(range(15)), name


async def test_a_turn_larger_than_a_script_call_is_cut_into_several(single: Target) -> None:
    store = single.store()
    writes = record_writes(store)
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 50, 50, True)
    tenants = [f"t{i % 12}" for i in range(3 * SPLIT * MAX_BATCH)]
    try:
        outcomes = await asyncio.gather(
            *(store.apply([spec], [tenant], 1, None, T, tenant) for tenant in tenants)
        )
    finally:
        await store.close()
    sizes = [size for write in writes for size in write]
    assert sum(sizes) == len(tenants)
    assert max(sizes) == MAX_BATCH
    for name in set(tenants):
        mine = [out[0] for tenant, out in zip(tenants, outcomes, strict=True) if tenant == name]
        assert sum(allowed for allowed, *_ in mine) == 50, name


async def test_a_key_of_the_wrong_type_fails_only_its_own_decision(target: Target) -> None:
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 5, 5, True)
    with target.clients() as clients:
        key, _ = counter_key("broken", spec.table, "broken", scoped=True)
        for client in clients:
            try:
                client.lpush(key, "not a counter")
            except redis.exceptions.ResponseError:
                continue  # MOVED: another node owns the slot
    store = target.store()
    tenants = [f"t{i}" for i in range(20)] + ["broken"]
    try:
        outcomes = await asyncio.gather(
            *(store.apply([spec], [tenant], 1, None, T, tenant) for tenant in tenants),
            return_exceptions=True,
        )
    finally:
        await store.close()
    broken = outcomes[-1]
    assert isinstance(broken, StoreError), broken
    assert "WRONGTYPE" in str(broken.__cause__)
    for outcome in outcomes[:-1]:
        assert not isinstance(outcome, BaseException), outcome
        assert outcome[0][0] is True
        assert outcome[0][2] == 4
    assert store.breaker.state == "closed"  # one bad key is not an outage


# --- 5. the server clock ---------------------------------------------------------------

HOURLY_POLICY = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
rate_limits:
  - name: hourly
    match: {paths: ["/**"]}
    window: 1h
    limits: {default: 10}
"""


def _server_hour_end(client: redis.Redis) -> float:
    """End of the current server-clock hour, waiting out the last 5 s of an hour."""
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    end = now - now % 3600 + 3600
    if end - now < 5:
        time.sleep(end - now + 0.1)  # so the test cannot straddle a window boundary
        return end + 3600
    return end


async def _two_guards(url: str, total: int) -> list[Decision]:
    ahead = Guard(parse_policy(HOURLY_POLICY), counters=url, clock=Clock(T + 3600))
    behind = Guard(parse_policy(HOURLY_POLICY), counters=url, clock=Clock(T))
    decisions = []
    async with ahead, behind:
        for i in range(total):
            guard = ahead if i % 2 else behind
            decisions.append(await guard.check("acme", "GET", "/x"))
    assert not any(d.degraded for d in decisions)
    return decisions


async def test_server_clock_shares_one_window_across_skewed_callers(
    redis_server: RedisServer, redis_url: str
) -> None:
    with redis_server.client() as client:
        end = _server_hour_end(client)
    decisions = await _two_guards(redis_url + "?clock=server&timeout=5", 16)
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 6
    # the window is the server's hour, whatever either caller believes the time is
    assert {d.reset for d in decisions} == {int(end)}


async def test_local_clock_follows_each_callers_clock(redis_url: str) -> None:
    # the contrast: with the callers' clocks an hour apart each counts in its own window
    # (and, one counter per rule, each starts the other's over): the limit does not hold
    decisions = await _two_guards(redis_url + "?clock=local&timeout=5", 24)
    assert sum(d.allowed for d in decisions) > 10
    hour = T - T % 3600
    assert {d.reset for d in decisions} == {int(hour + 3600), int(hour + 7200)}


# --- 6. decisions across slots ---------------------------------------------------------

TENANT_RULE = """\
  - name: per-tenant
    group: tenant
    match: {paths: ["/**"]}
    window: 1m
    limits: {default: TENANT_LIMIT}
"""
IP_RULE = """\
  - name: per-ip
    group: ip
    match: {paths: ["/**"]}
    per: [ip]
    window: 1m
    limits: {default: IP_LIMIT}
"""
HEAD = "version: 1\nplans: [{name: free, enforcement: hard}]\ndefault_plan: free\nrate_limits:\n"


def _cross_policy(order: str, tenant_limit: int, ip_limit: int) -> str:
    rules = [TENANT_RULE, IP_RULE] if order == "tenant-first" else [IP_RULE, TENANT_RULE]
    text = HEAD + "".join(rules)
    return text.replace("TENANT_LIMIT", str(tenant_limit)).replace("IP_LIMIT", str(ip_limit))


def _remaining(decision: Decision) -> dict[str, tuple[str, int | None]]:
    return {c.rule: (c.outcome, c.remaining) for c in decision.checks}


async def _cross_guard(
    target: Target, policy: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Guard, list[int]]:
    store = target.store()
    calls: list[int] = []
    original = store._call

    async def counting(
        keys: list[str], args: list[str], decided: bool = False, frees: bool = False
    ) -> Any:
        calls.append(len(keys))
        return await original(keys, args, decided, frees)

    monkeypatch.setattr(store, "_call", counting)
    return Guard(parse_policy(policy), counters=store, clock=Clock()), calls


def _assert_slots(target: Target, calls: list[int], checks: int, denied_after: int) -> None:
    keys = list(target.scan())
    if target.name == "redis":
        assert len(calls) == checks, "one script call per decision on a single Redis"
        return
    with target.clients() as clients:
        slots = {keyslot(clients[0], key) for key in keys}
    assert len(slots) >= 2, f"the test wants the rules in different slots: {keys}"
    # two slots: two calls per decision, plus a restore for each denial after an admit
    assert len(calls) == checks * 2 + denied_after, calls


@pytest.mark.parametrize("order", ["tenant-first", "ip-first"])
async def test_cross_slot_ip_denial_gives_the_tenant_counter_back(
    target: Target, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard, calls = await _cross_guard(target, _cross_policy(order, 10, 2), monkeypatch)
    async with guard:
        first = await guard.check("acme", "GET", "/x", ip="203.0.113.9")
        rules = ["per-tenant", "per-ip"] if order == "tenant-first" else ["per-ip", "per-tenant"]
        assert [c.rule for c in first.checks] == rules
        assert _remaining(first) == {"per-tenant": ("allowed", 9), "per-ip": ("allowed", 1)}
        second = await guard.check("acme", "GET", "/x", ip="203.0.113.9")
        assert _remaining(second) == {"per-tenant": ("allowed", 8), "per-ip": ("allowed", 0)}
        for _ in range(3):
            denied = await guard.check("acme", "GET", "/x", ip="203.0.113.9")
            assert (denied.allowed, denied.rule, denied.degraded) == (False, "per-ip", False)
            assert _remaining(denied) == {
                "per-tenant": ("uncounted", 8),
                "per-ip": ("denied", 0),
            }
        # the three denials took nothing from the tenant: 8 left before this one, 7 after
        other = await guard.check("acme", "GET", "/x", ip="198.51.100.7")
        assert _remaining(other) == {"per-tenant": ("allowed", 7), "per-ip": ("allowed", 1)}
    _assert_slots(target, calls, 6, 3 if order == "tenant-first" else 0)


@pytest.mark.parametrize("order", ["tenant-first", "ip-first"])
async def test_cross_slot_tenant_denial_gives_the_ip_counter_back(
    target: Target, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard, calls = await _cross_guard(target, _cross_policy(order, 2, 10), monkeypatch)
    async with guard:
        for left in (1, 0):
            admitted = await guard.check("acme", "GET", "/x", ip="203.0.113.9")
            assert _remaining(admitted) == {
                "per-tenant": ("allowed", left),
                "per-ip": ("allowed", 8 + left),
            }
        for _ in range(3):
            denied = await guard.check("acme", "GET", "/x", ip="203.0.113.9")
            assert (denied.allowed, denied.rule, denied.degraded) == (False, "per-tenant", False)
            assert _remaining(denied) == {"per-tenant": ("denied", 0), "per-ip": ("uncounted", 8)}
        # another tenant behind the same IP: the IP's three denials were given back
        other = await guard.check("globex", "GET", "/x", ip="203.0.113.9")
        assert _remaining(other) == {"per-tenant": ("allowed", 1), "per-ip": ("allowed", 7)}
    _assert_slots(target, calls, 6, 3 if order == "ip-first" else 0)


async def test_concurrent_cross_slot_denials_give_the_tenant_counter_back(
    cluster: Target,
) -> None:
    policy = parse_policy(_cross_policy("tenant-first", 100, 2))
    async with Guard(policy, counters=cluster.store(), clock=Clock()) as guard:
        burst = await asyncio.gather(
            *(guard.check("acme", "GET", "/x", ip="203.0.113.9") for _ in range(50))
        )
        assert sum(d.allowed for d in burst) == 2
        assert not any(d.degraded for d in burst)
        other = await guard.check("acme", "GET", "/x", ip="198.51.100.7")
    # 2 + 1 admitted; the 48 denials must have taken nothing from the tenant
    assert _remaining(other) == {"per-tenant": ("allowed", 97), "per-ip": ("allowed", 1)}


LEASE_POLICY = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
rate_limits:
  - name: uploads
    match: {paths: ["/**"]}
    per: [ip]
    algorithm: concurrency
    lease_ttl: 30s
    limits: {default: 1}
"""


async def test_releasing_a_tenant_keyed_lease_frees_it(target: Target) -> None:
    policy = parse_policy(LEASE_POLICY.replace("per: [ip]", "per: [tenant]"))
    async with Guard(policy, counters=target.store(), clock=Clock()) as guard:
        held = await guard.check("acme", "POST", "/upload", ip="203.0.113.9")
        assert held.allowed
        assert not (await guard.check("acme", "POST", "/upload", ip="203.0.113.9")).allowed
        await guard.release(held.lease)
        assert (await guard.check("acme", "POST", "/upload", ip="203.0.113.9")).allowed


async def test_releasing_an_ip_keyed_lease_frees_it(target: Target) -> None:
    async with Guard(parse_policy(LEASE_POLICY), counters=target.store(), clock=Clock()) as guard:
        held = await guard.check("acme", "POST", "/upload", ip="203.0.113.9")
        assert held.allowed
        assert not (await guard.check("globex", "POST", "/upload", ip="203.0.113.9")).allowed
        await guard.release(held.lease)
        again = await guard.check("globex", "POST", "/upload", ip="203.0.113.9")
    assert again.allowed, again.reason


# --- 7. Sentinel -----------------------------------------------------------------------

SMALL_POLICY = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
rate_limits:
  - name: small
    match: {paths: ["/**"]}
    window: 1m
    limits: {default: 3}
"""


@pytest.mark.parametrize("path", ["", "/0"])
async def test_sentinel_url_counts_on_the_master(
    redis_sentinel: RedisSentinel, redis_sentinel_url: str, path: str
) -> None:
    store = RedisCounters.from_url(f"{redis_sentinel_url}{path}?clock=local&timeout=2")
    async with Guard(parse_policy(SMALL_POLICY), counters=store, clock=Clock()) as guard:
        decisions = [await guard.check("acme", "GET", "/x") for _ in range(4)]
    assert [(d.allowed, d.remaining, d.degraded) for d in decisions] == [
        (True, 2, False),
        (True, 1, False),
        (True, 0, False),
        (False, 0, False),
    ]
    with redis_sentinel.master.client() as client:
        keys = list(client.scan_iter())
    assert len(keys) == 1
    assert hash_tag(keys[0]) == "acme"


def _clients_of(server: RedisServer) -> int:
    """Connections to ``server`` other than the one asking, once they settle (≤ 1 s)."""
    deadline = time.monotonic() + 1.0
    with server.client() as client:
        me = client.client_id()
        while True:
            others = [c for c in client.client_list() if int(c["id"]) != me]
            if not others or time.monotonic() >= deadline:
                return len(others)
            time.sleep(0.02)


async def test_closing_a_sentinel_store_closes_its_sentinel_connections(
    redis_sentinel: RedisSentinel, redis_sentinel_url: str
) -> None:
    store = RedisCounters.from_url(f"{redis_sentinel_url}?clock=local&timeout=2")
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 3, 3, True)
    outcomes = await store.apply([spec], ["acme"], 1, None, T, "acme")
    assert outcomes[0][:3] == (True, None, 2)
    await store.close()
    left = _clients_of(redis_sentinel)
    assert left == 0, f"{left} connection(s) to the sentinel still open after close()"


# --- 8. URLs ---------------------------------------------------------------------------


async def test_rediss_urls_pick_tls_without_connecting() -> None:
    # nothing listens on port 1: building the stores must not try to connect
    single = RedisCounters.from_url("rediss://127.0.0.1:1/0?timeout=0.5")
    cluster = RedisCounters.from_url("rediss+cluster://127.0.0.1:1")
    plain = open_counters("redis://127.0.0.1:1/0")
    try:
        assert isinstance(plain, RedisCounters)
        assert single._client.connection_pool.connection_class is SSLConnection
        assert single._timeout == 0.5
        kwargs = cluster._client.nodes_manager.connection_kwargs
        assert kwargs["connection_class"] is SSLConnection
        node = cluster._node_client("127.0.0.1", 2)  # the per-node pipelines use TLS too
        assert node.connection_pool.connection_class is SSLConnection
        await node.aclose()
        assert plain._client.connection_pool.connection_class is not SSLConnection
    finally:
        for store in (single, cluster, plain):
            await store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mongodb://x", r"'mongodb' is not supported; expected memory, redis"),
        ("redis+sentinel://h:1", r"needs the service name"),
        ("redis+sentinel://h:1/", r"needs the service name"),
        ("redis://127.0.0.1:1/0?clock=sundial", r"clock='sundial': expected server or local"),
        ("redis://127.0.0.1:1/0?timeout=abc", r"timeout='abc': expected seconds"),
        ("redis://127.0.0.1:1/0?timeout=0", r"timeout='0': expected a positive number"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_counters(url)
    with pytest.raises(ValueError, match=message):
        Guard(parse_policy(SMALL_POLICY), counters=url)


async def test_cluster_follows_a_moved_slot(
    redis_cluster: RedisCluster, redis_cluster_url: str
) -> None:
    """After a slot moves to another node (resharding, failover), the store's cached map
    is stale: the first reply is MOVED, the store relearns the map and the check counts."""
    store = open_counters(
        redis_cluster_url.replace("redis://", "redis+cluster://") + "?clock=local"
    )
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 5, 5, True)
    assert (await store.apply([spec], ["acme"], 1, None, T, "acme"))[0][0]
    with redis_cluster.nodes[0].client() as seed:
        slot = int(seed.execute_command("CLUSTER", "KEYSLOT", "{acme}"))
        nodes = [line.split() for line in seed.execute_command("CLUSTER", "NODES").splitlines()]
    owner = next(
        node for node in nodes
        if any(
            "-" in part and int(part.split("-")[0]) <= slot <= int(part.split("-")[1])
            for part in node[8:]
        )
    )  # fmt: skip
    target = next(node for node in nodes if node[0] != owner[0])
    redis_cluster.flushall()  # an empty slot moves without MIGRATE
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target[0])
    try:
        outcomes = await store.apply([spec], ["acme"], 1, None, T, "acme")
        assert outcomes[0][:3] == (True, None, 4)  # counted afresh on the new owner
        assert (await store.apply([spec], ["acme"], 1, None, T, "acme"))[0][2] == 3
    finally:
        redis_cluster.flushall()
        for node in redis_cluster.nodes:
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner[0])
        await store.close()


async def test_a_migrating_slot_still_answers_every_decision_of_the_turn(
    redis_cluster: RedisCluster, redis_cluster_url: str
) -> None:
    """A slot half-way through a migration: one of a tenant's keys moved, one did not. A
    turn's script call for that tenant answers TRYAGAIN; its calls are retried one by
    one, and the other tenants in the same turn are answered as usual."""
    store = open_counters(
        redis_cluster_url.replace("redis://", "redis+cluster://") + "?clock=local&timeout=5"
    )
    assert isinstance(store, RedisCounters)
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 10, 10, True)
    for key in ("a", "b"):
        assert (await store.apply([spec], [key], 1, None, T, "acme"))[0][2] == 9
    moved, _ = counter_key("acme", spec.table, "b", scoped=True)
    with redis_cluster.nodes[0].client() as seed:
        slot = int(seed.execute_command("CLUSTER", "KEYSLOT", moved))
        nodes = [line.split() for line in seed.execute_command("CLUSTER", "NODES").splitlines()]
    ids = {int(node[1].split(":")[1].split("@")[0]): node[0] for node in nodes}
    owner = next(n for n in redis_cluster.nodes if n.client().cluster("countkeysinslot", slot))
    other = next(n for n in redis_cluster.nodes if n.port != owner.port)
    with other.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner.port])
    with owner.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[other.port])
        client.execute_command("MIGRATE", "127.0.0.1", other.port, "", 0, 5000, "KEYS", moved)
    try:
        outcomes = await asyncio.gather(
            store.apply([spec], ["a"], 1, None, T, "acme"),
            store.apply([spec], ["b"], 1, None, T, "acme"),
            *(store.apply([spec], [f"t{i}"], 1, None, T, f"t{i}") for i in range(6)),
        )
        assert [outcome[0][:3] for outcome in outcomes] == (
            [(True, None, 8)] * 2 + [(True, None, 9)] * 6
        )
        assert store.breaker.state == "closed"
    finally:
        await store.close()
        for node in redis_cluster.nodes:  # end the migration where it stands: b's node
            with node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[other.port])
        redis_cluster.flushall()


async def test_a_refund_that_cannot_read_a_key_gives_nothing_back(single: Target) -> None:
    store = single.store()
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 10, 10, True)
    try:
        assert (await store.apply([spec], ["a"], 3, None, T, "acme"))[0][2] == 7
        kept = counter_key("acme", spec.table, "a", scoped=True)
        broken = counter_key("acme", spec.table, "b", scoped=True)
        with single.clients() as (client,):
            client.lpush(broken[0], "not a counter")
        keys, words = layout([spec, spec], [kept, broken])
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store._call(keys, record_head("refund", repr(T), 3, None, len(keys), words))
        assert (await store.apply([spec], ["a"], 1, None, T, "acme"))[0][2] == 6  # 3 + 1 used
    finally:
        await store.close()


async def test_a_cross_slot_decision_that_fails_in_a_later_slot_gives_back_the_earlier(
    cluster: Target,
) -> None:
    tenant_spec = CounterSpec("t|fixed-window|60", "fixed-window", 60.0, 10, 10, True, True)
    ip_spec = CounterSpec("ip|fixed-window|60", "fixed-window", 60.0, 10, 10, True, False)
    specs = [tenant_spec, ip_spec]
    store = cluster.store()
    try:
        first = await store.apply(specs, ["acme", "203.0.113.9"], 1, None, T, "acme")
        assert [outcome[2] for outcome in first] == [9, 9]
        broken, _ = counter_key("acme", ip_spec.table, "203.0.113.9", scoped=False)
        with cluster.clients() as clients:
            for client in clients:
                with contextlib.suppress(redis.exceptions.ResponseError):  # MOVED elsewhere
                    client.delete(broken)
                    client.lpush(broken, "not a counter")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.apply(specs, ["acme", "203.0.113.9"], 1, None, T, "acme")
        # the tenant's slot counted the failed decision, then gave it back
        again = await store.apply([tenant_spec], ["acme"], 1, None, T, "acme")
        assert again[0][2] == 8
    finally:
        await store.close()


def _owned_slots(client: redis.Redis, node_id: str) -> list[int]:
    slots: list[int] = []
    for line in client.execute_command("CLUSTER", "NODES").splitlines():  # type: ignore[no-untyped-call]
        parts = line.split()
        if parts[0] == node_id:
            for part in parts[8:]:
                first, _, last = part.partition("-")
                if first.isdigit():
                    slots += range(int(first), int(last or first) + 1)
    return slots


async def test_cluster_relearns_its_map_when_a_node_stops_answering() -> None:
    """A node dies after its slots went to another (a failover, a reshard): the cached
    map still points at it and only a live node says MOVED. The first failure makes the
    store ask the cluster for its map again, and the checks after it count."""
    with RedisCluster() as cluster:  # its own: this test kills a node
        url = cluster.url.replace("redis://", "redis+cluster://") + "?clock=local&timeout=1"
        store = RedisCounters.from_url(url)
        spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 10, 10, True)
        try:
            assert (await store.apply([spec], ["acme"], 1, None, T, "acme"))[0][2] == 9
            key, _ = counter_key("acme", spec.table, "acme", scoped=True)
            dying = store._client.get_node_from_key(key)
            doomed = next(node for node in cluster.nodes if node.port == dying.port)
            heir = next(node for node in cluster.nodes if node.port != dying.port)
            with doomed.client() as client:
                doomed_id = client.execute_command("CLUSTER", "MYID")
                slots = _owned_slots(client, doomed_id)
            with heir.client() as client:
                heir_id = client.execute_command("CLUSTER", "MYID")
            cluster.flushall()  # empty slots move without MIGRATE
            with heir.client() as client:
                # the highest config epoch first, so no gossip of the old owner's claim
                # (in flight while the nodes are told one by one) can win the slots back
                client.execute_command("CLUSTER", "BUMPEPOCH")
            for node in sorted(cluster.nodes, key=lambda node: node is not doomed):
                with node.client() as client:
                    pipe = client.pipeline(transaction=False)
                    for slot in slots:
                        pipe.execute_command("CLUSTER", "SETSLOT", slot, "NODE", heir_id)
                    pipe.execute()
            doomed.kill()
            with pytest.raises(StoreError):
                await store.apply([spec], ["acme"], 1, None, T, "acme")  # the stale map
            await asyncio.gather(*store._tasks)  # the map the failure asked for
            outcome = await store.apply([spec], ["acme"], 1, None, T, "acme")
            assert outcome[0][:3] == (True, None, 9)  # counted afresh on the heir
            assert store.breaker.state == "closed"
        finally:
            await store.close()


async def test_a_cluster_behind_a_password_is_reached_on_every_node(cluster: Target) -> None:
    """The store pipelines to each cluster node through a client of its own: those must
    log in as the URL says, like the cluster client does, or every batch would fail."""
    with cluster.clients() as clients:
        for client in clients:
            client.acl_setuser(
                "tgadmin", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                commands=["+@all"], reset=True,
            )  # fmt: skip
            client.acl_setuser("default", enabled=False)  # no one gets in without the password
    try:
        scheme, rest = cluster.url.split("://", 1)
        store = RedisCounters.from_url(f"{scheme}://tgadmin:pw@{rest}{OPTIONS}")
        spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 10, 10, True)
        try:
            tenants = [f"t{i}" for i in range(12)]  # spread over every node
            outcomes = await asyncio.gather(
                *(store.apply((spec,), [t], 1, None, T, t) for t in tenants)
            )
            assert [outcome[0][:3] for outcome in outcomes] == [(True, None, 9)] * 12
        finally:
            await store.close()
    finally:
        for node in cluster.nodes:
            with redis.Redis(port=node.port, username="tgadmin", password="pw") as client:
                client.acl_setuser(
                    "default", enabled=True, nopass=True, keys=["*"], channels=["*"],
                    commands=["+@all"], reset=True,
                )  # fmt: skip
                client.acl_deluser("tgadmin")


async def test_close_answers_the_calls_still_queued(single: Target) -> None:
    """Calls queued behind the batches in flight are sent and answered before the store
    closes its connections: none is left waiting."""
    store = single.store()
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 1000, 1000, True)
    pending = [
        asyncio.ensure_future(store.apply((spec,), [f"t{i}"], 1, None, T, f"t{i}"))
        for i in range(EAGER * SPLIT + 6)
    ]
    # made in one turn: SPLIT batches of EAGER calls went out, the rest wait for one
    assert len(store._queue) == 6
    await asyncio.sleep(0)
    more = [store.apply((spec,), ["late"], 1, None, T, "late") for _ in range(5)]
    await store.close()
    outcomes = await asyncio.gather(*pending, *more)
    assert [outcome[0][0] for outcome in outcomes] == [True] * len(outcomes)


async def test_under_load_batches_grow_instead_of_multiplying(single: Target) -> None:
    """At most SPLIT batches are in flight; checks made meanwhile wait and go out
    together, so a hundred busy callers send batches of dozens, not one per turn."""
    store = single.store()
    writes = record_writes(store)
    busy: list[int] = []  # slots in flight as each batch is written, itself included
    original = store._packed

    def packed(batch: list[Any], groups: list[list[int]]) -> bytes:
        busy.append(sum(slot is not None for slot in store._slots))
        return original(batch, groups)

    store._packed = packed  # type: ignore[method-assign]
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 1000, 1000, True)

    async def caller(tenant: str) -> None:
        for _ in range(20):
            outcome = await store.apply((spec,), [tenant], 1, None, T, tenant)
            assert outcome[0][0]

    try:
        await asyncio.gather(*(caller(f"t{i}") for i in range(100)))
    finally:
        await store.close()
    sizes = [sum(write) for write in writes]
    assert max(busy) == SPLIT
    assert sum(sizes) == 2000
    assert sum(sizes) / len(sizes) >= 20, sizes


async def test_a_lease_cannot_reshape_its_record(single: Target) -> None:
    """A lease id travels inside a record's word: whatever it holds (spaces, "|", the
    text of other specs), it stays one lease, and the other decisions of the same batch
    count where they belong."""
    store = single.store()
    spec = CounterSpec("api|fixed-window|60", "fixed-window", 60.0, 2, 2, True)
    lease_spec = "c|0|0.0|0|1|api%7Cfixed-window%7C60"
    try:
        assert (await store.apply((spec,), ["alice"], 1, None, T, "alice"))[0][2] == 1
        crafted = [f"x|1 {lease_spec} {lease_spec}", "x|2 c|0|0|0|1|zz", "a b", "|||"]

        async def count(tenant: str) -> int:
            return (await store.apply((spec,), [tenant], 1, None, T, tenant))[0][2]

        # tasks started in one turn: their records go out in one batch
        releases = [
            asyncio.ensure_future(store.release("p|concurrency|30", "dave", lease, T, "dave"))
            for lease in crafted
        ]
        counts = [asyncio.ensure_future(count(tenant)) for tenant in ("carol", "alice")]
        await asyncio.gather(*releases)
        # nothing was reset or counted elsewhere
        assert [await counted for counted in counts] == [1, 0]
        with single.clients() as (client,):
            assert client.exists("tg:{carol}") == 1
    finally:
        await store.close()


async def test_a_tenant_hash_lives_as_long_as_its_latest_writer_needs(single: Target) -> None:
    """With clock=local, writers may disagree on the time: the hash's TTL is kept on the
    server's clock, so a writer whose clock runs behind still gets the lifetime its own
    counter needs."""
    spec = CounterSpec("slow|fixed-window|60", "fixed-window", 60.0, 2, 2, True)
    ahead, behind = single.store(), single.store()
    try:
        # one window [T, T + 60): ahead sees it end 1 s after its now, behind 59 s after
        assert (await ahead.apply((spec,), ["acme"], 1, None, T + 59.0, "acme"))[0][0]
        assert (await behind.apply((spec,), ["acme"], 1, None, T + 1.0, "acme"))[0][0]
        with single.clients() as (client,):
            # behind's counter matters 59 s more (plus a second): its write extended the TTL
            assert client.pttl("tg:{acme}") >= 59_000
    finally:
        await ahead.close()
        await behind.close()


def test_a_sentinel_url_logs_in_to_the_master_with_its_credentials() -> None:
    store = RedisCounters.from_url("redis+sentinel://tg%40ops:p%3Ass@127.0.0.1:1/primary")
    kwargs = store._client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("tg@ops", "p:ss")


async def test_a_batch_is_written_in_the_turn_that_made_it(single: Target) -> None:
    """Once a lane is open, a batch goes straight to its stream when it is made, not in a
    task's first step: no coroutine write (``send_packed_command``) on the hot path.
    Were redis-py's streams renamed, this fails instead of the store quietly slowing."""
    store = single.store()
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 1000, 1000, True)
    try:
        await asyncio.gather(
            *(store.apply((spec,), ["acme"], 1, None, T, "acme") for _ in range(3 * SPLIT))
        )
        lanes = [lane for lane in store._lanes if lane is not None]
        assert lanes
        assert all(open_writer(lane) is not None for lane in lanes)
        slow: list[int] = []
        for lane in lanes:
            original = lane.send_packed_command

            async def counted(*args: Any, _original: Any = original, **kwargs: Any) -> None:
                slow.append(1)
                await _original(*args, **kwargs)

            lane.send_packed_command = counted
        pending = [store.apply((spec,), ["acme"], 1, None, T, "acme") for _ in range(EAGER)]
        assert store._queue == []  # written already: the loop has not turned yet
        outcomes = await asyncio.gather(*pending)
    finally:
        await store.close()
    assert slow == []
    remaining = sorted(outcome[0][2] for outcome in outcomes)
    assert remaining == list(range(1000 - 3 * SPLIT - EAGER, 1000 - 3 * SPLIT))


async def test_a_batch_cancelled_before_its_task_began_leaves_no_reply_behind(
    single: Target,
) -> None:
    """A batch written in the turn that made it, whose task is cancelled before it runs
    (a shutdown), leaves its reply unread on the lane: the lane is dropped, so no later
    call reads that reply as its own."""
    store = single.store()
    fw = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 1000, 1000, True)
    tb = CounterSpec("tb|token-bucket|10", "token-bucket", 10.0, 50, 50, True)
    try:
        await asyncio.gather(
            *(store.apply((fw,), ["acme"], 1, None, T, "acme") for _ in range(3 * SPLIT))
        )
        lost = [store.apply((fw,), ["acme"], 1, None, T, "acme") for _ in range(EAGER)]
        assert store._queue == []
        for task in list(store._tasks):
            task.cancel()
        results = await asyncio.gather(*lost, return_exceptions=True)
        assert all(isinstance(result, StoreError) for result in results), results
        # every later call gets its own reply: the token bucket's, not a window's
        later = await asyncio.gather(
            *(store.apply((tb,), [f"t{i}"], 1, None, T, f"t{i}") for i in range(3 * EAGER))
        )
    finally:
        await store.close()
    assert [outcome[0][2] for outcome in later] == [49] * (3 * EAGER)


async def test_calls_queued_past_their_timeout_are_not_sent_nor_held_against_redis(
    single: Target,
) -> None:
    """Calls that waited in this process for longer than the timeout (a busy event loop,
    or slow batches ahead) are answered with an error and not sent, as they would count
    for no one. Redis was not asked: the breaker stays closed, however often it happens."""
    store = single.store()
    spec = CounterSpec("fw|fixed-window|60", "fixed-window", 60.0, 1000, 1000, True)
    try:
        await store.apply((spec,), ["acme"], 1, None, T, "acme")
        for _ in range(2 * store.breaker.threshold):
            sent = [
                store.apply((spec,), ["acme"], 1, None, T, "acme") for _ in range(SPLIT * EAGER)
            ]
            late = [store.apply((spec,), ["late"], 1, None, T, "late") for _ in range(5)]
            store._queued_at -= 10.0  # as if queued ten seconds ago: timeout=5
            assert all(outcome[0][0] for outcome in await asyncio.gather(*sent))
            failed = await asyncio.gather(*late, return_exceptions=True)
            assert all(isinstance(error, StoreError) for error in failed), failed
            assert "not sent: queued for longer than the timeout (5 s)" in str(failed[0])
            assert store.breaker.state == "closed"
        with single.clients() as clients:
            assert not clients[0].exists(counter_key("late", spec.table, "late", scoped=True)[0])
    finally:
        await store.close()
