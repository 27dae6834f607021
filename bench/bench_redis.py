"""Decisions per second on one real Redis: tenantguard against ``limits`` and a ceiling.

DESIGN.md's bar: against Redis, concurrent checks are batched, so throughput is many
times one round trip per hit. Measured on the traffic production sends
(``bench/traffic.py``: Zipf-skewed tenants, a fresh id in every id segment, the durable
ledger), because batching that only pays off on a hot key would be no answer.

One ``redis-server`` (``tests/servers.py``, started here on a free loopback port) serves
the whole run and is flushed before every measurement. The same requests are sent by 1,
10 and 100 concurrent callers:

* tenantguard: C asyncio tasks in this process share one ``Guard`` on
  ``redis://…?clock=server`` and the SQLite ledger (a temp file seeded with the
  generator's records and overrides; ``start()`` loads it before any measurement). The
  policy is the Okta table plus a tenant-wide token bucket: two rules per decision, with
  the plans' real numbers, so the heaviest tenants are denied at these rates (the share
  allowed is printed). Its store gathers concurrent checks into batched calls. Run on
  asyncio's own event loop, and on uvloop (what ``tenantguard serve`` runs on).
* limits: ``FixedWindowRateLimiter.hit`` on ``RedisStorage`` with redis-py's sync client,
  keyed by tenant and route template (as a decorator on each route keys it).
  "One connection" is read literally: C threads share one limiter whose client is held
  to a single connection (``BlockingConnectionPool(max_connections=1)``), so callers
  serialize on it. For context the same C threads are also measured with redis-py's
  default pool, which opens a connection per concurrently active thread.
* ceiling: ``redis-benchmark -c 100``, pipelined, replaying tenantguard's own
  ``counters.lua`` (FCALL of the function it loads, the two counters of one tenant's hash
  per decision, the same rule arguments; one decision per call, and 16 per call as a busy
  client batches them, over as many tenants as the traffic, drawn uniformly: redis-benchmark
  cannot skew them) and a one-line INCR script
  (EVAL): what the server itself can answer, with no Python client in the way.

Each figure is the median of several runs (``RUNS``; more at 100 callers, where the
spread is printed as min-max); the machine is small and shared, so compare the ratios,
which are measured in the same run. ``--quick`` runs fewer and shorter measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
import uvloop
from limits import RateLimitItemPerMinute, storage, strategies

from tenantguard import Guard
from tenantguard.stores import CounterSpec
from tenantguard.stores._redis_records import layout, record_head
from tenantguard.stores.redis_store import FUNCTION, LIBRARY, counter_key

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import RedisServer  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from traffic import REALISTIC, Request, Traffic, okta_policy  # noqa: E402

CALLERS = (1, 10, 100)
RUNS = {1: 3, 10: 3, 100: 5}  # measurements per caller count; the median is reported
SECONDS = 2.0  # aimed length of one measurement; N is fixed from a short probe
PROBE = 0.4  # seconds of the probe, which also warms connections and caches
MIN_DECISIONS = 1_000
MAX_DECISIONS = 150_000
CEILING_REQUESTS = 400_000
CEILING_PIPELINE = 100
CEILING_CLIENTS = 100
CEILING_RECORDS = 16  # decisions per script call in the batched ceiling, as a busy client sends
CEILING_ROUNDS = 3
TIMEOUT = "1"  # seconds per store call; a degraded decision would flatter the figures


class Result:
    """One measurement: decisions, seconds, how many were allowed, connections used."""

    __slots__ = ("allowed", "connections", "count", "degraded", "seconds", "server_us")

    def __init__(self, count: int, seconds: float, allowed: int, degraded: int = 0) -> None:
        self.count = count
        self.seconds = seconds
        self.allowed = allowed
        self.degraded = degraded
        self.connections = 0
        self.server_us = 0.0  # Redis CPU per decision (INFO commandstats)

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def connections(control: redis.Redis) -> int:
    """Clients connected to the server now, not counting ``control`` itself."""
    info = control.info("clients")
    return int(info["connected_clients"]) - 1


def script_time(control: redis.Redis) -> float:
    """Microseconds of server time in the counters (FCALL: tenantguard's function; EVALSHA:
    ``limits``'s script) since the last ``CONFIG RESETSTAT``."""
    stats = control.info("commandstats")
    return sum(float(stats.get(name, {}).get("usec", 0.0)) for name in _SCRIPT_STATS)


_SCRIPT_STATS = ("cmdstat_fcall", "cmdstat_evalsha")


def sized(probe: Result, seconds: float) -> int:
    """The fixed number of decisions that takes about ``seconds`` at the probe's rate."""
    wanted = int(probe.rate * seconds)
    return max(MIN_DECISIONS, min(MAX_DECISIONS, wanted))


class Stats:
    """A variant's runs at one caller count: the median run, and the spread."""

    def __init__(self, results: list[Result]) -> None:
        self.results = results
        ordered = sorted(results, key=lambda result: result.rate)
        self.median = ordered[len(ordered) // 2]
        self.low, self.high = ordered[0].rate, ordered[-1].rate

    @property
    def rate(self) -> float:
        return statistics.median(result.rate for result in self.results)

    def cell(self) -> str:
        if len(self.results) < 5:
            return f"{self.rate:,.0f}"
        return f"{self.rate:,.0f} ({self.low:,.0f}-{self.high:,.0f})"


def measured(
    measure: Callable[[int, int], Result],
    control: redis.Redis,
    name: str,
    callers: int,
    *,
    runs: int,
    seconds: float,
) -> Stats:
    """Probe for N, then ``runs`` runs of N decisions, flushing before each."""
    control.flushall()
    probe_count = MIN_DECISIONS
    while True:
        probe = measure(callers, probe_count)
        if probe.seconds >= PROBE or probe_count >= MAX_DECISIONS:
            break
        probe_count = min(MAX_DECISIONS, probe_count * 4)
        control.flushall()
    count = sized(probe, seconds)
    results = []
    for _ in range(runs):
        control.flushall()
        control.config_resetstat()
        result = measure(callers, count)
        result.connections = connections(control)
        result.server_us = script_time(control) / result.count
        results.append(result)
    stats = Stats(results)
    mid = stats.median
    spread = ", ".join(f"{result.rate:,.0f}" for result in results)
    print(
        f"  {name:<22} {callers:>3} callers  N={count:<7,} median {stats.rate:>9,.0f}/s"
        f"  ({spread})  allowed {mid.allowed / mid.count:.0%}"
        f"  conns {mid.connections}  redis {mid.server_us:.1f} us/decision"
        + (f"  DEGRADED {mid.degraded}" if mid.degraded else ""),
        flush=True,
    )
    return stats


# -- tenantguard ---------------------------------------------------------------------------


CALLER = "bench-caller"


async def run_tenantguard(guard: Guard, requests: Sequence[Request], callers: int) -> Result:
    """``callers`` tasks, each checking its share of ``requests`` one after another."""
    tally = [0, 0]

    async def caller(chunk: Sequence[Request]) -> None:
        check = guard.check
        allowed = degraded = 0
        for tenant, method, path, _template, _rule, _client, _ip, _at in chunk:
            decision = await check(tenant, method, path)
            allowed += decision.allowed
            degraded += decision.degraded
        tally[0] += allowed
        tally[1] += degraded

    chunks = [requests[index::callers] for index in range(callers)]
    start = time.perf_counter()
    await asyncio.gather(*(asyncio.create_task(caller(c), name=CALLER) for c in chunks))
    seconds = time.perf_counter() - start
    return Result(len(requests), seconds, tally[0], tally[1])


def bench_tenantguard(
    url: str,
    ledger: str,
    requests: list[Request],
    control: redis.Redis,
    options: Options,
    *,
    fast_loop: bool = False,
) -> list[Stats]:
    """On asyncio's own event loop, or on uvloop (which ``tenantguard serve`` runs on,
    through uvicorn)."""
    loop = uvloop.new_event_loop() if fast_loop else asyncio.new_event_loop()
    guard = loop.run_until_complete(open_guard(url, ledger))
    name = "tenantguard, uvloop" if fast_loop else "tenantguard"

    def measure(callers: int, count: int) -> Result:
        return loop.run_until_complete(run_tenantguard(guard, requests[:count], callers))

    try:
        return [
            measured(measure, control, name, callers, runs=options.runs[callers],
                     seconds=options.seconds)
            for callers in CALLERS
        ]  # fmt: skip
    finally:
        # after Ctrl-C the callers are still pending: end them before closing the store
        # (only them: the guard's own tasks, such as its event writer, end in close())
        pending = {task for task in asyncio.all_tasks(loop) if task.get_name() == CALLER}
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(_settle(pending))
        loop.run_until_complete(guard.close())
        loop.close()


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


async def open_guard(url: str, ledger: str) -> Guard:
    guard = Guard(
        okta_policy(tenant_bucket=True),
        counters=f"{url}?clock=server&timeout={TIMEOUT}",
        ledger=ledger,
    )
    start = getattr(guard, "start", None)
    if start is not None:
        await start()  # the tenant directory, where the engine has one
    return guard


# -- limits --------------------------------------------------------------------------------


def run_limits(
    limiter: strategies.FixedWindowRateLimiter, requests: Sequence[Request], callers: int
) -> Result:
    """``callers`` threads sharing ``limiter``, each hitting its share of ``requests``."""
    item = RateLimitItemPerMinute(1_000_000)
    tally: list[int] = []
    lock = threading.Lock()
    gate = threading.Barrier(callers + 1)
    stop = threading.Event()  # set on Ctrl-C, so no thread outlives the server

    def caller(chunk: Sequence[Request]) -> None:
        hit = limiter.hit
        allowed = 0
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            return
        for tenant, _method, _path, template, _rule, _client, _ip, _at in chunk:
            if stop.is_set():
                return
            allowed += hit(item, tenant, template)
        with lock:
            tally.append(allowed)

    threads = [
        threading.Thread(target=caller, args=(requests[index::callers],), daemon=True)
        for index in range(callers)
    ]
    try:
        for thread in threads:
            thread.start()
        gate.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        gate.abort()
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    if len(tally) != callers:
        raise RuntimeError("a limits caller thread failed; see its traceback above")
    return Result(len(requests), seconds, sum(tally))


def bench_limits(
    url: str,
    requests: list[Request],
    control: redis.Redis,
    options: Options,
    *,
    one_connection: bool,
) -> list[Stats]:
    if one_connection:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=1, timeout=None)
        store = storage.RedisStorage(url, connection_pool=pool)
        name = "limits, 1 connection"
    else:
        store = storage.RedisStorage(url)
        name = "limits, default pool"
    limiter = strategies.FixedWindowRateLimiter(store)

    def measure(callers: int, count: int) -> Result:
        return run_limits(limiter, requests[:count], callers)

    try:
        return [
            measured(measure, control, name, callers, runs=options.runs[callers],
                     seconds=options.seconds)
            for callers in CALLERS
        ]  # fmt: skip
    finally:
        store.storage.close()


# -- redis-benchmark ceiling ---------------------------------------------------------------


def counters_argv(control: redis.Redis, records: int = 1) -> list[str]:
    """FCALL of ``counters.lua`` as tenantguard sends it for a developer-free tenant on
    /api/v1/users/{id}: the endpoint's fixed window and the tenant's token bucket, both
    fields of one random tenant's hash (``__rand_int__``), server clock; ``records`` such
    decisions per call, as a busy client batches them."""
    control.function_load(LIBRARY, replace=True)
    specs = (
        CounterSpec("users-get|fixed-window|60", "fixed-window", 60.0, 100, 100, True),
        CounterSpec("tenant-bucket|token-bucket|10", "token-bucket", 10.0, 200, 200, True),
    )
    places = [counter_key("t", spec.table, "t", scoped=True) for spec in specs]
    record = record_head("apply", "", 1, None, 1, layout(specs, places)[1])
    keys = ["tg:{t__rand_int__}"] * records
    return ["FCALL", FUNCTION, str(len(keys)), *keys, *record * records]


INCR_ARGV = ["EVAL", "return redis.call('INCR', KEYS[1])", "1", "key:__rand_int__"]


def run_ceiling(port: int, argv: Sequence[str], records: int, keyspace: int) -> float:
    """redis-benchmark's own requests/s (it excludes its start-up) times ``records``."""
    command = [
        "redis-benchmark", "-p", str(port), "-n", str(CEILING_REQUESTS // records),
        "-P", str(max(1, CEILING_PIPELINE // records)), "-c", str(CEILING_CLIENTS),
        "-r", str(keyspace), "-q", *argv,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    found = re.findall(r"([\d.]+) requests per second", done.stdout)
    if not found:
        raise RuntimeError(f"no requests/s in redis-benchmark output: {done.stdout[-500:]!r}")
    return float(found[-1]) * records


def bench_ceiling(
    port: int,
    control: redis.Redis,
    name: str,
    argv: Sequence[str],
    records: int = 1,
    *,
    keyspace: int,
) -> float:
    """Decisions/s (``records`` per call) the server answers for ``argv``, over
    ``keyspace`` random tenants."""
    rates = []
    for _ in range(CEILING_ROUNDS):
        control.flushall()
        control.config_resetstat()
        rates.append(run_ceiling(port, argv, records, keyspace))
    spread = ", ".join(f"{rate:,.0f}" for rate in rates)
    cost = control.info("commandstats")
    calls = cost.get("cmdstat_fcall") or cost.get("cmdstat_eval") or {}
    print(
        f"  {name:<22} {CEILING_CLIENTS:>3} clients  P={max(1, CEILING_PIPELINE // records)}"
        f"  best {max(rates):>9,.0f}/s  ({spread})"
        f"  redis {float(calls.get('usec_per_call', 0.0)) / records:.1f} us/decision",
        flush=True,
    )
    return max(rates)


# -- the table -----------------------------------------------------------------------------


class Options:
    """How many runs per caller count, and how long each aims to take."""

    def __init__(self, *, quick: bool) -> None:
        self.runs = dict.fromkeys(CALLERS, 2) if quick else dict(RUNS)
        self.seconds = 0.6 if quick else SECONDS


def report(options: Options) -> None:
    started = time.perf_counter()
    traffic = Traffic(REALISTIC)
    requests = traffic.requests(MAX_DECISIONS)
    print(traffic.describe(requests), flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="tenantguard-bench-redis-") as directory,
        RedisServer() as server,
    ):
        ledger = f"sqlite:///{Path(directory) / 'ledger.db'}"
        asyncio.run(traffic.seed_sqlite(ledger, okta_policy(tenant_bucket=True)))
        control: redis.Redis = server.client()
        try:
            print(
                f"redis-server {control.info('server')['redis_version']} on port {server.port};"
                f" tenantguard on the SQLite ledger (seeded temp file); flushed before each run",
                flush=True,
            )
            ours = bench_tenantguard(server.url, ledger, requests, control, options)
            fast = bench_tenantguard(server.url, ledger, requests, control, options, fast_loop=True)
            theirs = bench_limits(server.url, requests, control, options, one_connection=True)
            pooled = bench_limits(server.url, requests, control, options, one_connection=False)
            keyspace = traffic.config.tenants
            single = bench_ceiling(
                server.port, control, "ceiling counters.lua", counters_argv(control),
                keyspace=keyspace,
            )  # fmt: skip
            lua = bench_ceiling(
                server.port,
                control,
                f"ceiling, {CEILING_RECORDS}/call",
                counters_argv(control, CEILING_RECORDS),
                CEILING_RECORDS,
                keyspace=keyspace,
            )
            incr = bench_ceiling(
                server.port, control, "ceiling EVAL INCR", INCR_ARGV, keyspace=keyspace
            )
        finally:
            control.close()
    print()
    print(traffic.describe())
    print(
        "decisions/s on one Redis, realistic traffic (tenantguard: 2 rules/decision, SQLite"
        " ledger; limits: 1 rule/hit keyed by tenant + route template); medians, at"
        f" {CALLERS[-1]} callers of {options.runs[CALLERS[-1]]} runs with min-max"
    )
    print(
        f"{'callers':>7} | {'tenantguard':>24} | {'on uvloop':>24} | {'limits 1conn':>22} |"
        f" {'ratio':>5} | {'uvloop':>6} | {'limits pool':>11} | {'ratio':>5} | {'ceiling':>9}"
    )
    for callers, ours_one, fast_one, theirs_one, pooled_one in zip(
        CALLERS, ours, fast, theirs, pooled, strict=True
    ):
        print(
            f"{callers:>7} | {ours_one.cell():>24} | {fast_one.cell():>24} |"
            f" {theirs_one.cell():>22} | {ours_one.rate / theirs_one.rate:>4.1f}x |"
            f" {fast_one.rate / theirs_one.rate:>5.1f}x | {pooled_one.rate:>11,.0f} |"
            f" {ours_one.rate / pooled_one.rate:>4.1f}x | {lua:>9,.0f}"
        )
    print(
        f"ceiling: redis-benchmark -c {CEILING_CLIENTS}, pipelined FCALL of tenantguard's"
        f" counters.lua with the same two rules, {CEILING_RECORDS} decisions per call over"
        f" {keyspace:,} tenants ({single:,.0f}/s at one per call); EVAL of a bare INCR:"
        f" {incr:,.0f}/s"
    )
    print(
        "limits 1conn: C threads share one limiter held to one connection (callers"
        " serialize); limits pool: redis-py's default pool, a connection per thread"
    )
    top = max(ours[-1], fast[-1], key=lambda stats: stats.rate)
    ratio = ours[-1].rate / theirs[-1].rate
    fast_ratio = fast[-1].rate / theirs[-1].rate
    verdict = "met" if max(ratio, fast_ratio) >= 10 else "NOT met"
    print(
        f"tenantguard at {CALLERS[-1]} callers = {ratio:.1f}x limits on asyncio's loop"
        f" ({ours[-1].low / theirs[-1].high:.1f}-{ours[-1].high / theirs[-1].low:.1f}x from"
        f" the spreads), {fast_ratio:.1f}x on uvloop"
        f" ({fast[-1].low / theirs[-1].high:.1f}-{fast[-1].high / theirs[-1].low:.1f}x)"
        f" (target >= 10x: {verdict}); {top.rate / pooled[-1].rate:.1f}x limits with a"
        f" connection per thread; {top.rate / lua:.0%} of the counters.lua ceiling;"
        f" Redis CPU {top.median.server_us:.1f} us per decision vs"
        f" {theirs[-1].median.server_us:.1f} us per limits hit"
    )
    print(f"total {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    args = parser.parse_args()
    try:
        report(Options(quick=args.quick))
    except KeyboardInterrupt:
        # the RedisServer context has stopped the server by now
        print("\ninterrupted; redis-server stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
