"""Durable quota acquires per second: the SQL ledger on a SQLite file and on PostgreSQL.

Each acquire is one ``Ledger.change_usage`` of one counter by 1 with its own idempotency
key, as ``guard.quotas.acquire(..., idempotency_key=...)`` sends it: a transaction that
looks the key up, applies the conditional update and stores the key with the result. It
is acknowledged only once durable: SQLite runs WAL with ``synchronous=FULL``, and the
PostgreSQL server (``tests/servers.py``, initdb in a temp dir, started for this run)
runs with ``fsync=on``; both on this machine's disk.

1 and 8 concurrent callers are asyncio tasks in this process sharing one ledger, whose
calls run on worker threads over a connection pool. The tenants are drawn from
``bench/traffic.py``'s realistic traffic (Zipf-skewed over 100,000 org ids, whose
description is printed): the heaviest tenant's usage row takes about one acquire in
seven, so concurrent callers meet on it as they would in production.
After each measurement, the same keys are re-sent once, as retrying clients would: a
replay answers from the stored key and changes nothing (checked).

Every measurement starts on an empty database (a new SQLite file, PostgreSQL's schema
dropped); each figure is the best of ``ROUNDS``. The machine is small and shared, and
fsync latency dominates: compare the rows, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tenantguard.ledger import Ledger, UsageChange, open_ledger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import PostgresServer  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from traffic import REALISTIC, Traffic  # noqa: E402

CALLERS = (1, 8)
ROUNDS = 2
SECONDS = 2.5  # aimed length of one measurement; N is fixed from a short probe
PROBE = 0.5  # seconds of the probe, which also warms the pool
MIN_ACQUIRES = 50
MAX_ACQUIRES = 20_000
NOW = 1_700_000_000.0
CHANGE = (UsageChange(quota="access-tokens", scope="", period="2023-11", amount=1, limit=10**9),)


class Result:
    """One measurement: acquires, seconds, per-call latencies, replay seconds."""

    __slots__ = ("count", "latencies", "replay_seconds", "seconds")

    def __init__(
        self, count: int, seconds: float, latencies: list[float], replay_seconds: float
    ) -> None:
        self.count = count
        self.seconds = seconds
        self.latencies = latencies
        self.replay_seconds = replay_seconds

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def replay_rate(self) -> float:
        return self.count / self.replay_seconds

    def percentile(self, q: int) -> float:
        """Milliseconds; ``q`` in 1…99."""
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1000


async def _send_all(
    ledger: Ledger, keys: Sequence[int], tenants: Sequence[str], callers: int
) -> list[float]:
    """``callers`` tasks, each acquiring its share of ``keys`` one after another; key
    ``k`` is acquired for ``tenants[k]``."""
    latencies: list[float] = []

    async def caller(chunk: Sequence[int]) -> None:
        change = ledger.change_usage
        clock = time.perf_counter
        for key in chunk:
            start = clock()
            result = await change(tenants[key], CHANGE, idempotency_key=f"req-{key}", now=NOW)
            latencies.append(clock() - start)
            if not result.ok:
                raise AssertionError(f"acquire {key} refused: {result}")

    await asyncio.gather(*(caller(keys[index::callers]) for index in range(callers)))
    return latencies


async def _measure(url: str, count: int, callers: int) -> Result:
    ledger = open_ledger(url)
    tenants = TRAFFIC.tenant_sample(count, random.Random(f"ledger:{count}"))
    try:
        assert await ledger.ping(), f"{url} does not answer"
        keys = range(count)
        start = time.perf_counter()
        latencies = await _send_all(ledger, keys, tenants, callers)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        await _send_all(ledger, keys, tenants, callers)  # every key again: replays only
        replay_seconds = time.perf_counter() - start
        used = 0
        for tenant in set(tenants):
            used += sum(row.used for row in await ledger.usage(tenant))
        if used != count:
            raise AssertionError(f"{count} distinct keys acquired, but the ledger counts {used}")
    finally:
        await ledger.close()
    return Result(count, seconds, latencies, replay_seconds)


def best(
    name: str, fresh: Callable[[], str], callers: int, *, rounds: int, seconds: float
) -> Result:
    """Probe for N, then the best of ``rounds`` runs of N acquires, each on an empty DB."""
    count = MIN_ACQUIRES
    while True:
        probe = asyncio.run(_measure(fresh(), count, callers))
        if probe.seconds >= PROBE or count >= MAX_ACQUIRES:
            break
        count = min(MAX_ACQUIRES, count * 4)
    count = max(MIN_ACQUIRES, min(MAX_ACQUIRES, int(probe.rate * seconds)))
    results = [asyncio.run(_measure(fresh(), count, callers)) for _ in range(rounds)]
    top = max(results, key=lambda result: result.rate)
    spread = ", ".join(f"{result.rate:,.0f}" for result in results)
    print(
        f"  {name:<10} {callers:>2} callers  N={count:<6,} best {top.rate:>7,.0f}/s  ({spread})"
        f"  p50 {top.percentile(50):.2f} ms  p99 {top.percentile(99):.2f} ms"
        f"  replays {top.replay_rate:,.0f}/s",
        flush=True,
    )
    return top


TRAFFIC = Traffic(REALISTIC)


def report(*, rounds: int, seconds: float) -> None:
    started = time.perf_counter()
    rows: list[tuple[str, int, Result]] = []
    with tempfile.TemporaryDirectory(prefix="tenantguard-bench-ledger-") as directory:
        files = iter(range(1_000_000))

        def fresh_sqlite() -> str:
            return f"sqlite:///{Path(directory) / f'ledger-{next(files)}.db'}"

        print("SQLite (WAL, synchronous=FULL), a new file per measurement", flush=True)
        rows += [
            (
                "sqlite",
                callers,
                best("sqlite", fresh_sqlite, callers, rounds=rounds, seconds=seconds),
            )
            for callers in CALLERS
        ]

    with PostgresServer() as server:
        with server.connect() as conn:
            version = conn.execute("SHOW server_version").fetchone()

        def fresh_postgres() -> str:
            with server.connect() as conn:
                conn.execute("DROP SCHEMA public CASCADE")
                conn.execute("CREATE SCHEMA public")
            url: str = server.url
            return url

        print(
            f"PostgreSQL {version[0] if version else '?'} (fsync=on) on port {server.port},"
            " schema dropped per measurement",
            flush=True,
        )
        rows += [
            (
                "postgresql",
                callers,
                best("postgresql", fresh_postgres, callers, rounds=rounds, seconds=seconds),
            )
            for callers in CALLERS
        ]

    print()
    print(TRAFFIC.describe())
    print(f"durable acquires/s (change_usage, 1 counter, unique idempotency key; best of {rounds})")
    print(
        f"{'ledger':<10} | {'callers':>7} | {'acquires/s':>10} | {'p50 ms':>7} | {'p99 ms':>7} |"
        f" {'replays/s':>9}"
    )
    for name, callers, result in rows:
        print(
            f"{name:<10} | {callers:>7} | {result.rate:>10,.0f} | {result.percentile(50):>7.2f} |"
            f" {result.percentile(99):>7.2f} | {result.replay_rate:>9,.0f}"
        )
    print(f"total {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one short round each")
    args = parser.parse_args()
    try:
        if args.quick:
            report(rounds=1, seconds=0.8)
        else:
            report(rounds=ROUNDS, seconds=SECONDS)
    except KeyboardInterrupt:
        # the PostgresServer context has stopped the server by now
        print("\ninterrupted; PostgreSQL stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
