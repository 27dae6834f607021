"""A full in-process check against the ``limits`` library's fixed-window ``hit``.

Both run in this process, on the same traffic: random tenants and request paths drawn
from the Okta example table, plus a tenant-wide token bucket for tenantguard (so each
tenantguard check evaluates two rules where ``limits`` evaluates one). The machine is
shared, so what matters is the ratio, measured as the best of several rounds each.

Also measures memory per active token bucket with a million buckets.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
from pathlib import Path

from limits import RateLimitItemPerMinute, storage, strategies

from tenantguard import Guard, parse_policy
from tenantguard.stores import CounterSpec, MemoryCounters

ROOT = Path(__file__).resolve().parent.parent
TENANT_BUCKET = """
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 200}
"""
PATHS = [
    ("GET", "/api/v1/apps"),
    ("GET", "/api/v1/apps/{id}"),
    ("GET", "/api/v1/groups"),
    ("DELETE", "/api/v1/groups/{id}"),
    ("GET", "/api/v1/users"),
    ("GET", "/api/v1/users/{id}"),
    ("PUT", "/api/v1/users/{id}"),
    ("GET", "/api/v1/logs"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/sessions/{id}"),
    ("POST", "/oauth2/default/v1/token"),
    ("POST", "/oauth2/v1/token"),
    ("GET", "/oauth2/v1/clients"),
    ("GET", "/api/v1/meta/types"),
]
TENANTS = 1000
IDS = 50
REQUESTS = 100_000
ROUNDS = 5


def traffic(seed: int = 7) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(REQUESTS):
        method, template = rng.choice(PATHS)
        path = template.replace("{id}", f"00u{rng.randrange(IDS)}")
        out.append((f"tenant-{rng.randrange(TENANTS)}", method, path))
    return out


def policy_text() -> str:
    text = (ROOT / "examples" / "okta-management.yaml").read_text()
    return text.rstrip() + "\n" + TENANT_BUCKET


def bench_tenantguard(requests: list[tuple[str, str, str]]) -> float:
    clock = [1_700_000_000.0]
    guard = Guard(parse_policy(policy_text()), clock=lambda: clock[0])

    async def run() -> float:
        check = guard.check
        start = time.perf_counter()
        for tenant, method, path in requests:
            clock[0] += 0.0001
            decision = await check(tenant, method, path)
            decision.allowed  # noqa: B018 - a caller reads the answer
        return time.perf_counter() - start

    return asyncio.run(run()) / len(requests)


def bench_limits(requests: list[tuple[str, str, str]]) -> float:
    limiter = strategies.FixedWindowRateLimiter(storage.MemoryStorage())
    item = RateLimitItemPerMinute(1_000_000)
    hit = limiter.hit
    start = time.perf_counter()
    for tenant, method, path in requests:
        hit(item, tenant, method, path)
    return (time.perf_counter() - start) / len(requests)


def bytes_per_bucket(count: int = 1_000_000) -> float:
    store = MemoryCounters()
    spec = CounterSpec("tenant-bucket|token-bucket|10", "token-bucket", 10.0, 200, 200, True)
    tables = store.bind([spec])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    now = 1_700_000_000.0
    for index in range(count):
        # the tenant id is created here, so its bytes are counted too
        store.apply_now([spec], [f"tenant-{index:07d}"], 1, None, now, tables)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert store.size() == count
    return (after - before) / count


def main() -> None:
    requests = traffic()
    ours, theirs = [], []
    for _ in range(ROUNDS):
        ours.append(bench_tenantguard(requests))
        theirs.append(bench_limits(requests))
    best_ours, best_theirs = min(ours), min(theirs)
    print("in-process check (Okta table + tenant bucket), best of", ROUNDS, "rounds")
    print(f"  tenantguard Guard.check   {best_ours * 1e6:6.2f} us/check  (2 rules)")
    print(f"  limits FixedWindow.hit    {best_theirs * 1e6:6.2f} us/hit    (1 rule)")
    ratio = best_ours / best_theirs
    print(f"  ratio tenantguard/limits  {ratio:6.2f}x  (target <= 1.0x, stretch 0.5x)")
    size = bytes_per_bucket()
    print(f"memory: {size:.0f} bytes per active token bucket, 1M buckets (target <= 250)")


if __name__ == "__main__":
    main()
