"""Zero over-admission from several processes at once, on a single Redis and on the cluster.

Four worker processes (spawned, so nothing is shared but the server) each build their own
store and ``Guard`` and fire 250 concurrent checks at one tenant's limit (joining over a
few loop turns, so several pipelines per process interleave with the other processes' at
the server); the parent sums what they admitted. A barrier releases the bursts together.

Time is injected (``clock=local``): either one fixed ``now`` for every call in every
process, so no window can roll over and no token can come back, or ``now + k × 1 ms`` for
a process's k-th call, which bounds the refill a bucket may add to ``rate × 0.249 s``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
from collections.abc import Iterator
from multiprocessing.pool import Pool
from typing import Any, NamedTuple

import pytest

from tenantguard import Decision, Guard, parse_policy
from tenantguard.stores.redis_store import RedisCounters

PROCESSES = 4
CALLERS = 250  # concurrent checks per process: 1000 attempts in all
LIMIT = 300
T = 1_700_000_040.0  # an exact minute since the epoch
START = T + 1.0  # inside the minute [T, T + 60) and the second [T + 1, T + 2)
WAVES = 10
STEP = 0.001  # seconds between a process's consecutive calls in the moving-clock variant
TIMEOUT = 30.0  # seconds: the barrier, and the whole pool run

POLICY = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
on_store_error: deny
rate_limits:
  - name: the-limit
    match: {paths: ["/**"]}
    algorithm: ALGORITHM
    WINDOW
    limits: {default: LIMIT}
"""
# token bucket and GCRA: 300 a second with a burst of 300, so 1 ms refills 0.3 of a token
WINDOWS = {
    "fixed-window": "window: 1m",
    "sliding-window": "window: 1m",
    "token-bucket": "window: 1s",
    "gcra": "window: 1s",
    "concurrency": "lease_ttl: 30s",
}
RATE = {"token-bucket": LIMIT / 1.0, "gcra": LIMIT / 1.0}

_WORKER: dict[str, Any] = {}


class Job(NamedTuple):
    url: str
    algorithm: str
    step: float


def _init_worker(barrier: Any) -> None:
    _WORKER["barrier"] = barrier


def _run(job: Job) -> tuple[int, int]:
    """In a worker process: (admitted, degraded) of ``CALLERS`` concurrent checks."""
    return asyncio.run(_burst(job))


async def _burst(job: Job) -> tuple[int, int]:
    text = POLICY.replace("ALGORITHM", job.algorithm).replace("WINDOW", WINDOWS[job.algorithm])
    calls = itertools.count()

    def clock() -> float:  # a check reads the clock once, before it first awaits
        return START + next(calls) * job.step

    policy = parse_policy(text.replace("LIMIT", str(LIMIT)))
    store = RedisCounters.from_url(job.url)
    async with Guard(policy, counters=store, clock=clock) as guard:
        assert await store.ping(), f"{job.url} does not answer"
        _WORKER["barrier"].wait(TIMEOUT)  # every process connected: go together

        async def caller(index: int) -> Decision:
            # callers join in WAVES successive loop turns: several pipelines per process
            # in flight at once, interleaving with the other processes' at the server
            for _ in range(index % WAVES):
                await asyncio.sleep(0)
            return await guard.check("acme", "GET", "/x")

        decisions = await asyncio.gather(*(caller(index) for index in range(CALLERS)))
    return sum(d.allowed for d in decisions), sum(d.degraded for d in decisions)


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    workers = context.Pool(PROCESSES, initializer=_init_worker, initargs=(barrier,))
    try:
        yield workers
    finally:
        workers.close()
        workers.join()


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
    else:
        seed: str = request.getfixturevalue("redis_cluster_url")
        url = seed.replace("redis://", "redis+cluster://", 1)
    return url + "?clock=local&timeout=5"


def _admitted(pool: Pool, job: Job) -> int:
    # a worker blocks at the barrier until all four have a job, so each job gets its own
    results = pool.map_async(_run, [job] * PROCESSES, chunksize=1).get(TIMEOUT)
    assert sum(degraded for _, degraded in results) == 0, results
    return sum(admitted for admitted, _ in results)


@pytest.mark.parametrize("algorithm", list(WINDOWS))
def test_time_standing_still_admits_exactly_the_limit(
    pool: Pool, store_url: str, algorithm: str
) -> None:
    assert _admitted(pool, Job(store_url, algorithm, 0.0)) == LIMIT


@pytest.mark.parametrize("algorithm", list(RATE))
def test_moving_clocks_admit_no_more_than_burst_plus_refill(
    pool: Pool, store_url: str, algorithm: str
) -> None:
    elapsed = (CALLERS - 1) * STEP
    refill = RATE[algorithm] * elapsed  # 74.7 tokens
    admitted = _admitted(pool, Job(store_url, algorithm, STEP))
    assert admitted <= LIMIT + refill + 1
    # the bucket starts full, and its tokens can hide at most ``refill`` behind skewed calls
    assert admitted >= LIMIT - refill - 1
