"""A full in-process check against the ``limits`` library's fixed-window ``hit``, on the
traffic production sends, and what a process holds as that traffic goes on.

DESIGN.md's bar: on real traffic (many Zipf-skewed tenants, a fresh id in every ``{id}``
segment, the durable ledger) a full check costs no more than one ``limits`` hit. So both
run here, in one process, on the same requests from ``bench/traffic.py``, interleaved
round by round so that the shared machine's drift hits both alike:

* tenantguard: ``Guard.check`` on the Okta table plus a tenant-wide token bucket (two
  rules per check), with the plans' real numbers (the heaviest tenants do get denied, as
  in production; the share allowed is printed). Once on the SQLite ledger (a temp file
  seeded with the generator's records and overrides: what ``tenantguard serve`` runs by
  default) and once on the in-process ledger seeded alike. Each round is a new ``Guard``
  on a newly parsed policy, so it starts with cold caches and empty counters, and
  ``await guard.start()`` (which loads the tenant directory) runs before the clock
  starts. The guard's clock is the requests' simulated arrival times.
* limits: ``FixedWindowRateLimiter.hit`` on ``MemoryStorage``, keyed by tenant and route
  template, as a slowapi or flask-limiter decorator on each route keys it. One item for
  every route (its number does not change what a hit costs).

One line repeats the comparison on the old cache-friendly shape (1,000 tenants, 50 ids),
labelled as such. Then two measurements of memory, each in a fresh process:

* paths: RSS after 100k and after 1M checks with a fresh id in every id segment. Live
  counters are kept out of it: 1,000 tenants (so counters number at most tenants x rules
  and are all made early; their count is printed at both points) and every limit raised
  out of reach (no denials, so no events pile up). What grows from 100k to 1M is state
  keyed by path: route and plan caches.
* tenants: the Python heap (tracemalloc) and RSS that ``await guard.start()`` adds when
  the SQLite ledger holds 1M tenant records, per tenant: the in-memory tenant directory.
  ``tenant_status().tenants`` says how many it loaded; if none, there is no directory in
  this engine yet and the figure says so.

Usage: ``python bench/bench_check.py [--quick]``. The machine is shared: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from limits import RateLimitItemPerMinute, storage, strategies

from tenantguard import Guard
from tenantguard.ledger import Ledger, MemoryLedger
from tenantguard.stores import CounterSpec, MemoryCounters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traffic import (
    CACHE_FRIENDLY,
    EPOCH,
    REALISTIC,
    Request,
    Traffic,
    many_records,
    okta_policy,
    seed_sqlite,
)

REQUESTS = 100_000
ROUNDS = 5
PATHS = (100_000, 1_000_000)  # unique-path checks at which RSS is read
PATH_TENANTS = 1_000
DIRECTORY = 1_000_000  # tenant records for the directory's memory
CEILING = 10**9
RSS_TARGET_MB = 50.0
BYTES_TARGET = 300.0


@dataclass
class Round:
    seconds: float
    count: int
    allowed: int

    @property
    def per_check(self) -> float:
        return self.seconds / self.count


@dataclass
class Series:
    """One variant's rounds; ``allowed`` is the share the last round let through."""

    name: str
    rounds: list[Round]

    @property
    def best(self) -> float:
        return min(r.per_check for r in self.rounds)

    @property
    def median(self) -> float:
        return statistics.median(r.per_check for r in self.rounds)

    @property
    def allowed(self) -> float:
        last = self.rounds[-1]
        return last.allowed / last.count


# -- the two sides --------------------------------------------------------------------------


async def run_guard(requests: Sequence[Request], ledger: Ledger | str) -> Round:
    """One round on a new guard: a newly parsed policy (so its route table's own cache is
    cold too), empty counters, ``start()`` awaited before the clock starts."""
    clock = [EPOCH]
    guard = Guard(okta_policy(tenant_bucket=True), ledger=ledger, clock=lambda: clock[0])
    try:
        await start_guard(guard)
        check = guard.check
        allowed = 0
        began = time.perf_counter()
        for tenant, method, path, _template, _rule, _client, _ip, at in requests:
            clock[0] = at
            decision = await check(tenant, method, path)
            allowed += decision.allowed
        seconds = time.perf_counter() - began
    finally:
        await guard.close()
    return Round(seconds, len(requests), allowed)


async def start_guard(guard: Guard) -> bool:
    """``await guard.start()`` where the engine has it; False where it does not."""
    start = getattr(guard, "start", None)
    if start is None:
        return False
    await start()
    return True


def run_limits(requests: Sequence[Request]) -> Round:
    limiter = strategies.FixedWindowRateLimiter(storage.MemoryStorage())
    item = RateLimitItemPerMinute(1_000_000)
    hit = limiter.hit
    allowed = 0
    began = time.perf_counter()
    for tenant, _method, _path, template, _rule, _client, _ip, _at in requests:
        allowed += hit(item, tenant, template)
    seconds = time.perf_counter() - began
    return Round(seconds, len(requests), allowed)


SQLITE = "tenantguard Guard.check, SQLite ledger"
MEMORY = "tenantguard Guard.check, memory ledger"
LIMITS = "limits FixedWindowRateLimiter.hit"


async def compare(
    traffic: Traffic, requests: Sequence[Request], rounds: int, *, sqlite_url: str | None
) -> dict[str, Series]:
    """Every variant once per round, in turn; the in-process ledger is seeded anew for
    each round (closing a guard closes its ledger)."""
    policy = okta_policy(tenant_bucket=True)
    series: dict[str, Series] = {}
    for number in range(1, rounds + 1):
        measured: list[tuple[str, Round]] = []
        if sqlite_url is not None:
            measured.append((SQLITE, await run_guard(requests, sqlite_url)))
        ledger = MemoryLedger()
        await traffic.seed_ledger(ledger, policy)
        measured.append((MEMORY, await run_guard(requests, ledger)))
        measured.append((LIMITS, run_limits(requests)))
        for name, result in measured:
            series.setdefault(name, Series(name, [])).rounds.append(result)
        print(
            f"  round {number}: "
            + "   ".join(f"{name} {r.per_check * 1e6:.2f} us" for name, r in measured),
            flush=True,
        )
    return series


# -- memory ---------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident set now (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def counter_count(guard: Guard) -> int | None:
    store = guard.counters
    return store.size() if isinstance(store, MemoryCounters) else None


async def paths_child(points: Sequence[int]) -> dict[str, Any]:
    """Checks until ``points[-1]`` paths with a fresh id have been seen (each such path
    is new; the rest of the traffic, collection routes, repeats); RSS at each point."""
    traffic = Traffic(replace(REALISTIC, tenants=PATH_TENANTS))
    policy = okta_policy(tenant_bucket=True, ceiling=CEILING)
    ledger = MemoryLedger()
    await traffic.seed_ledger(ledger, policy)
    clock = [EPOCH]
    guard = Guard(policy, ledger=ledger, clock=lambda: clock[0])
    await start_guard(guard)
    gc.collect()
    readings = [{"unique": 0, "checks": 0, "rss_mb": rss_mb(), "counters": counter_count(guard)}]
    checks = unique = allowed = 0
    wanted = sorted(points)
    for chunk in traffic.stream():
        for tenant, method, path, template, _rule, _client, _ip, at in chunk:
            clock[0] = at
            allowed += (await guard.check(tenant, method, path)).allowed
            checks += 1
            if "{" in template:
                unique += 1
                if unique == wanted[0]:
                    gc.collect()
                    readings.append({
                        "unique": unique, "checks": checks, "rss_mb": rss_mb(),
                        "counters": counter_count(guard),
                    })  # fmt: skip
                    wanted.pop(0)
                    if not wanted:
                        break
        if not wanted:
            break
    await guard.close()
    return {"readings": readings, "allowed": allowed / checks, "tenants": PATH_TENANTS}


async def directory_child(url: str, trace: bool) -> dict[str, Any]:
    """What ``start()`` adds to the process with ``url``'s tenants in the ledger: the
    Python heap (``trace``: tracemalloc, which costs RSS itself) or RSS (not traced)."""
    guard = Guard(okta_policy(tenant_bucket=True), ledger=url)
    gc.collect()
    rss_before = rss_mb()
    if trace:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0] if trace else 0
    began = time.perf_counter()
    has_start = await start_guard(guard)
    status = getattr(guard, "tenant_status", None)
    deadline = time.monotonic() + 600
    while status is not None and status().ledger == "loading" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - began
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory() if trace else (0, 0)
    if trace:
        tracemalloc.stop()
    result = {
        "has_start": has_start,
        "loaded": status().tenants if status is not None else None,
        "seconds": seconds,
        "traced_bytes": traced - traced_before,
        "peak_bytes": peak - traced_before,
        "rss_mb": rss_mb() - rss_before,
    }
    await guard.close()
    return result


def child(*args: str) -> dict[str, Any]:
    """Run this file with ``args`` in a fresh process; its last output line is JSON."""
    argv = [sys.executable, __file__, *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the report -----------------------------------------------------------------------------


def print_table(title: str, series: dict[str, Series]) -> None:
    limits = series[LIMITS]
    print(title)
    print(
        f"  {'variant':<40} | {'best us':>7} | {'median us':>9} | {'allowed':>7} |"
        f" {'/limits best':>12} | {'/limits median':>14}"
    )
    for one in series.values():
        print(
            f"  {one.name:<40} | {one.best * 1e6:>7.2f} | {one.median * 1e6:>9.2f} |"
            f" {one.allowed:>7.1%} | {one.best / limits.best:>11.2f}x |"
            f" {one.median / limits.median:>13.2f}x"
        )


async def report(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    count = 20_000 if args.quick else args.requests
    rounds = args.rounds
    traffic = Traffic(REALISTIC)
    requests = traffic.requests(count)
    policy = okta_policy(tenant_bucket=True)
    with tempfile.TemporaryDirectory(prefix="tenantguard-bench-check-") as directory:
        url = f"sqlite:///{Path(directory) / 'ledger.db'}"
        await traffic.seed_sqlite(url, policy)
        print(
            f"in-process check, {rounds} rounds of {count:,} requests, each variant in turn"
            f" (SQLite ledger: {url.rpartition('/')[2]} in a temp dir, seeded)",
            flush=True,
        )
        realistic = await compare(traffic, requests, rounds, sqlite_url=url)
    friendly_traffic = Traffic(CACHE_FRIENDLY)
    friendly_requests = friendly_traffic.requests(count)
    friendly = await compare(friendly_traffic, friendly_requests, rounds, sqlite_url=None)

    paths = (20_000, 200_000) if args.quick else PATHS
    print(f"memory: checks until {paths[-1]:,} unique paths, in a fresh process", flush=True)
    grown = child("--paths-child", *map(str, paths))
    tenants = 100_000 if args.quick else args.directory
    with tempfile.TemporaryDirectory(prefix="tenantguard-bench-directory-") as directory:
        url = f"sqlite:///{Path(directory) / 'directory.db'}"
        began = time.perf_counter()
        written = await seed_sqlite(url, many_records(tenants))
        print(
            f"memory: {written:,} tenant records written to SQLite in"
            f" {time.perf_counter() - began:.1f} s; loading them in fresh processes",
            flush=True,
        )
        traced = child("--directory-child", url, "trace")
        resident = child("--directory-child", url, "rss")

    print()
    print(traffic.describe(requests))
    print_table(
        f"µs per check, realistic traffic ({count:,} requests; best and median of {rounds}"
        " rounds; tenantguard: 2 rules, limits: 1)",
        realistic,
    )
    print(friendly_traffic.describe(friendly_requests))
    print_table(
        "µs per check, CACHE-FRIENDLY traffic (1,000 uniform tenants, 50 ids per kind):"
        " the shape that flatters caches, for comparison only",
        {MEMORY: friendly[MEMORY], LIMITS: friendly[LIMITS]},
    )
    ratio = realistic[SQLITE].median / realistic[LIMITS].median
    verdict = "met" if ratio <= 1.0 else "NOT met"
    print(
        f"  target: Guard.check on the SQLite ledger <= 1.0x a limits hit on realistic"
        f" traffic: {ratio:.2f}x (medians): {verdict}"
    )
    print()
    print_paths(grown)
    print_directory(traced, resident, tenants)
    buckets = 100_000 if args.quick else 1_000_000
    size = bytes_per_bucket(buckets)
    print(
        f"memory, counters: {size:.0f} bytes per active token bucket, {buckets:,} buckets,"
        f" tenant ids included (target <= {BUCKET_TARGET}:"
        f" {'met' if size <= BUCKET_TARGET else 'NOT met'})"
    )
    print(f"total {time.perf_counter() - started:.0f} s")


BUCKET_TARGET = 250


def bytes_per_bucket(count: int) -> float:
    """Heap per live counter of the memory store: one tenant-keyed token bucket each."""
    store = MemoryCounters()
    spec = CounterSpec("tenant-bucket|token-bucket|10", "token-bucket", 10.0, 200, 200, True)
    tables = store.bind([spec])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for index in range(count):
        # the tenant id is created here, so its bytes are counted too
        store.apply_now([spec], [f"00o{index:017d}"], 1, None, EPOCH, tables)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if store.size() != count:
        raise RuntimeError(f"expected {count} live buckets, the store holds {store.size()}")
    return (after - before) / count


def print_paths(grown: dict[str, Any]) -> None:
    readings = grown["readings"]
    first, last = readings[1], readings[-1]
    growth = last["rss_mb"] - first["rss_mb"]
    verdict = "met" if growth <= RSS_TARGET_MB else "NOT met"
    print(
        f"memory, unique paths: RSS of a fresh process checking realistic traffic from"
        f" {grown['tenants']:,} tenants (so live counters stay few: their count is shown)"
        f" with every limit at {CEILING:,} (so no denials, no events; allowed"
        f" {grown['allowed']:.0%}); a path with an id in it is new every time:"
    )
    for reading in readings:
        print(
            f"  after {reading['unique']:>9,} unique paths ({reading['checks']:>9,} checks):"
            f" RSS {reading['rss_mb']:7.1f} MB, live counters {reading['counters']}"
        )
    print(
        f"  growth from {first['unique']:,} to {last['unique']:,} unique paths:"
        f" {growth:.1f} MB (target <= {RSS_TARGET_MB:g} MB: {verdict})"
    )


def print_directory(traced: dict[str, Any], resident: dict[str, Any], tenants: int) -> None:
    print(f"memory, tenant directory: start() with {tenants:,} tenant records in SQLite:")
    if not traced["has_start"]:
        print("  Guard has no start() in this engine state: nothing to measure")
        return
    loaded = traced["loaded"]
    print(
        f"  start() took {traced['seconds']:.1f} s (traced) / {resident['seconds']:.1f} s;"
        f" tenant_status().tenants = {loaded}"
    )
    per = traced["traced_bytes"] / tenants
    rss_per = resident["rss_mb"] * 1024 * 1024 / tenants
    print(
        f"  Python heap retained: {traced['traced_bytes'] / 1e6:.1f} MB = {per:.0f} bytes per"
        f" tenant (peak while loading {traced['peak_bytes'] / tenants:.0f}); RSS growth"
        f" {resident['rss_mb']:.1f} MB = {rss_per:.0f} bytes per tenant"
    )
    if not loaded:
        print(
            "  start() loaded no tenants: the engine has no tenant directory yet, so these"
            " figures measure an empty start(), not a directory (target <= 300 bytes)"
        )
    else:
        verdict = "met" if per <= BYTES_TARGET else "NOT met"
        print(f"  target <= {BYTES_TARGET:g} bytes per tenant (heap): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="reduced sizes, for development")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--directory", type=int, default=DIRECTORY, help="tenant records")
    parser.add_argument("--paths-child", nargs="+", type=int, metavar="CHECKS")
    parser.add_argument("--directory-child", nargs=2, metavar=("URL", "MODE"))
    args = parser.parse_args()
    if args.paths_child:
        print(json.dumps(asyncio.run(paths_child(args.paths_child))))
    elif args.directory_child:
        url, mode = args.directory_child
        print(json.dumps(asyncio.run(directory_child(url, mode == "trace"))))
    else:
        asyncio.run(report(args))


if __name__ == "__main__":
    main()
