"""Requests/s of a FastAPI app behind ``TenantGuardMiddleware``, bare, and behind slowapi.

One trivial JSON endpoint, the same app in every variant; each variant runs under
uvicorn (uvloop + httptools, one worker, no access log) in its own process on a free
loopback port, and ``wrk -t2 -c32`` loads it, sending one tenant in ``X-Tenant-Id``:

* bare: no rate limiting;
* tenantguard on memory / on Redis: the middleware, ``tenant="header:X-Tenant-Id"``,
  one fixed-window rule of 1,000,000 per minute per tenant on every path (``?clock=server``
  on Redis);
* slowapi on memory / on Redis: the equivalent limit, ``1000000/minute`` keyed by the
  same header, fixed window, ``headers_enabled=True``, with its pure-ASGI middleware.

Every limit is far above what a run sends, so the requests are allowed (the table says
how many were not 2xx). The Redis variants share one ``redis-server``
(``tests/servers.py``), flushed before each measurement. Variants are measured in turn,
round after round, so drift hits all of them alike; each figure is the best round.

Then ``POST /v1/check`` of ``tenantguard serve`` itself (memory counters and ledger, its
own uvicorn settings), under wrk with a Lua script that varies tenant and path:
requests/s and p50/p99 latency from ``wrk --latency``.

Without wrk (``scripts/install-servers`` installs it) an async httpx load generator in
another process stands in: slower than the servers, so its figures say little.

Usage: ``python bench/bench_http.py [--seconds 10] [--rounds 2]``. The machine is small
and shared, and wrk runs on it too: compare the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import RedisServer, free_port  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

LIMIT = 1_000_000
TENANT = "tenant-1"
PATH = "/api/v1/items"
POLICY = f"""\
version: 1
plans:
  - {{name: free, enforcement: hard}}
default_plan: free
headers: [okta]
rate_limits:
  - name: everything
    match: {{paths: ["/**"]}}
    algorithm: fixed-window
    window: 1m
    limits: {{default: {LIMIT}}}
"""
VARIANTS = ("bare", "tenantguard-memory", "slowapi-memory", "tenantguard-redis", "slowapi-redis")
LIMIT_HEADER = {
    "bare": None,
    "tenantguard-memory": "X-Rate-Limit-Limit",
    "tenantguard-redis": "X-Rate-Limit-Limit",
    "slowapi-memory": "X-RateLimit-Limit",
    "slowapi-redis": "X-RateLimit-Limit",
}
THREADS = 2
CONNECTIONS = 32
WARMUP = 1.0
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CHECK_TENANTS = 1000
CHECK_TOKEN = "bench-token"
CHECK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
local n = 0
request = function()
  n = n + 1
  local body = string.format(
    '{{"tenant":"tenant-%d","method":"GET","path":"/api/v1/items/%d"}}', n % {tenants}, n % 50)
  return wrk.format(nil, "/v1/check", nil, body)
end
"""


# -- the apps (run in their own processes) ------------------------------------------------


def build_app(variant: str, redis_url: str) -> Any:
    """The one-endpoint FastAPI app, wrapped as ``variant`` says."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get(PATH)
    async def items() -> dict[str, object]:
        return {"items": [], "ok": True}

    if variant.startswith("tenantguard"):
        from tenantguard import Guard, parse_policy
        from tenantguard.middleware import TenantGuardMiddleware

        counters = "memory" if variant.endswith("memory") else f"{redis_url}?clock=server"
        guard = Guard(parse_policy(POLICY), counters=counters)
        return TenantGuardMiddleware(app, guard, tenant="header:X-Tenant-Id")
    if variant.startswith("slowapi"):
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware
        from starlette.requests import Request

        def tenant_key(request: Request) -> str:
            return request.headers.get("x-tenant-id", "")

        storage = "memory://" if variant.endswith("memory") else redis_url
        app.state.limiter = Limiter(
            key_func=tenant_key,
            default_limits=[f"{LIMIT}/minute"],
            headers_enabled=True,
            strategy="fixed-window",
            storage_uri=storage,
        )
        app.add_middleware(SlowAPIASGIMiddleware)
    return app


def serve(variant: str, port: int, redis_url: str) -> None:
    import uvicorn

    uvicorn.run(
        build_app(variant, redis_url),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
    )


# -- processes -----------------------------------------------------------------------------


class Server:
    """One server process on a free loopback port; its output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        directory: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = directory / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                env=env,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at startup:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(path, headers={"X-Tenant-Id": TENANT}).status_code < 500:
                        return
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.name} not up in {STARTUP_TIMEOUT:g} s")
                time.sleep(0.05)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextlib.contextmanager
def servers(redis_url: str, directory: Path) -> Iterator[dict[str, Server]]:
    """Every app variant and ``tenantguard serve``, started at once, stopped at the end."""
    started: dict[str, Server] = {}
    try:
        for variant in VARIANTS:
            port = free_port()
            argv = [sys.executable, __file__, "--serve", variant, str(port), redis_url]
            started[variant] = Server(variant, argv, port, directory)
        policy = directory / "policy.yaml"
        policy.write_text(POLICY)
        port = free_port()
        argv = [
            str(Path(sys.executable).parent / "tenantguard"), "serve",
            "--policy", str(policy), "--port", str(port),
            "--counters", "memory", "--ledger", "memory",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGUARD_")}
        env["TENANTGUARD_ADMIN_TOKEN"] = CHECK_TOKEN
        started["serve"] = Server("serve", argv, port, directory, env)
        for name, server in started.items():
            server.wait_ready("/healthz" if name == "serve" else PATH)
        yield started
    finally:
        for server in started.values():
            server.stop()


# -- load ----------------------------------------------------------------------------------


@dataclass
class Load:
    rate: float
    requests: int
    non_2xx: int = 0
    errors: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> Load:
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if found is None or total is None:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{output}")
    load = Load(float(found.group(1)), int(total.group(1)))
    if non := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        load.non_2xx = int(non.group(1))
    if errors := re.search(r"Socket errors:(.*)", output):
        load.errors = sum(int(n) for n in re.findall(r"\d+", errors.group(1)))
    for percent, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        load.latency_ms[percent] = float(value) * _UNITS_MS[unit]
    return load


def run_wrk(url: str, seconds: float, *, script: Path | None = None) -> Load:
    argv = [
        "wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s",
        "--latency", "-H", f"X-Tenant-Id: {TENANT}",
    ]  # fmt: skip
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)


def run_httpx_load(url: str, seconds: float, *, script: Path | None = None) -> Load:
    """The stand-in for wrk: CONNECTIONS asyncio clients in a separate process."""
    check = script is not None
    argv = [sys.executable, __file__, "--httpx-load", url, str(seconds), "1" if check else "0"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)


def httpx_load(url: str, seconds: float, check: bool) -> None:
    """Print wrk-like lines for ``seconds`` of load from CONNECTIONS concurrent clients."""
    latencies: list[float] = []
    counts = [0, 0]

    async def worker(client: httpx.AsyncClient, index: int, deadline: float) -> None:
        n = index
        while time.perf_counter() < deadline:
            n += CONNECTIONS
            start = time.perf_counter()
            if check:
                body = {"tenant": f"tenant-{n % CHECK_TENANTS}", "method": "GET", "path": PATH}
                response = await client.post("/v1/check", json=body)
            else:
                response = await client.get(PATH)
            latencies.append(time.perf_counter() - start)
            counts[0] += 1
            counts[1] += not 200 <= response.status_code < 400

    async def main() -> float:
        headers = {"X-Tenant-Id": TENANT, "Authorization": f"Bearer {CHECK_TOKEN}"}
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
            start = time.perf_counter()
            deadline = start + seconds
            await asyncio.gather(*(worker(client, i, deadline) for i in range(CONNECTIONS)))
            return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies.sort()
    print(f"  {counts[0]} requests in {elapsed:.2f}s")
    print(f"Requests/sec: {counts[0] / elapsed:.2f}")
    if counts[1]:
        print(f"  Non-2xx or 3xx responses: {counts[1]}")
    for percent in (50, 99):
        value = latencies[min(len(latencies) - 1, len(latencies) * percent // 100)]
        print(f"     {percent}%    {value * 1000:.2f}ms")


# -- the table -----------------------------------------------------------------------------


def report(seconds: float, rounds: int) -> None:
    started = time.perf_counter()
    load = run_wrk if shutil.which("wrk") else run_httpx_load
    generator = (
        f"wrk -t{THREADS} -c{CONNECTIONS} -d{seconds:g}s"
        if load is run_wrk
        else f"httpx load generator ({CONNECTIONS} clients, another process; wrk not found)"
    )
    with (
        tempfile.TemporaryDirectory(prefix="tenantguard-bench-http-") as tmp,
        RedisServer() as redis_server,
    ):
        directory = Path(tmp)
        control: redis.Redis = redis_server.client()
        script = directory / "check.lua"
        script.write_text(CHECK_LUA.format(token=CHECK_TOKEN, tenants=CHECK_TENANTS))
        try:
            with servers(redis_server.url, directory) as running:
                print(
                    f"{generator}; uvicorn (uvloop, httptools, 1 worker) per app;"
                    f" redis-server {control.info('server')['redis_version']};"
                    f" best of {rounds} rounds",
                    flush=True,
                )
                sanity(running)
                for variant in VARIANTS:  # warm up: imports, connections, caches
                    load(running[variant].url + PATH, WARMUP)
                results: dict[str, list[Load]] = {variant: [] for variant in VARIANTS}
                for round_number in range(1, rounds + 1):
                    for variant in VARIANTS:
                        control.flushall()
                        result = load(running[variant].url + PATH, seconds)
                        results[variant].append(result)
                        print(
                            f"  round {round_number} {variant:<20} {result.rate:>9,.0f}/s"
                            f"  non-2xx {result.non_2xx}  socket errors {result.errors}",
                            flush=True,
                        )
                load(running["serve"].url + "/v1/check", WARMUP, script=script)
                checks = [
                    load(running["serve"].url + "/v1/check", seconds, script=script)
                    for _ in range(rounds)
                ]
        finally:
            control.close()
    best = {variant: max(results[variant], key=lambda r: r.rate) for variant in VARIANTS}
    print_table(best, max(checks, key=lambda r: r.rate))
    print(f"total {time.perf_counter() - started:.0f} s")


def sanity(running: dict[str, Server]) -> None:
    """Each variant answers 200 and, where it limits, says so in its headers."""
    with httpx.Client(timeout=5.0, headers={"X-Tenant-Id": TENANT}) as client:
        for variant, header in LIMIT_HEADER.items():
            response = client.get(running[variant].url + PATH)
            if response.status_code != 200:
                raise RuntimeError(f"{variant}: {response.status_code} {response.text}")
            if header is not None and response.headers.get(header) != str(LIMIT):
                raise RuntimeError(f"{variant}: no {header}: {LIMIT} in {response.headers}")
        body = {"tenant": TENANT, "method": "GET", "path": PATH}
        auth = {"Authorization": f"Bearer {CHECK_TOKEN}"}
        response = client.post(running["serve"].url + "/v1/check", json=body, headers=auth)
        if response.status_code != 200 or response.json()["allowed"] is not True:
            raise RuntimeError(f"serve /v1/check: {response.status_code} {response.text}")


def print_table(best: dict[str, Load], check: Load) -> None:
    bare = best["bare"].rate
    print()
    print(f"requests/s, GET {PATH} (one JSON endpoint), limit {LIMIT:,}/min per tenant")
    print(f"{'variant':<20} | {'requests/s':>10} | {'vs bare':>7} | {'non-2xx':>7}")
    for variant in VARIANTS:
        result = best[variant]
        print(
            f"{variant:<20} | {result.rate:>10,.0f} | {result.rate / bare:>6.2f}x |"
            f" {result.non_2xx:>7}"
        )
    targets = [
        ("tenantguard-memory / bare", best["tenantguard-memory"].rate / bare, 0.8),
        (
            "tenantguard-memory / slowapi-memory",
            best["tenantguard-memory"].rate / best["slowapi-memory"].rate,
            1.3,
        ),
        (
            "tenantguard-redis / slowapi-redis",
            best["tenantguard-redis"].rate / best["slowapi-redis"].rate,
            3.0,
        ),
    ]
    print()
    for name, ratio, target in targets:
        verdict = "met" if ratio >= target else "NOT met"
        print(f"{name:<36} {ratio:>6.3f}x  (target >= {target:g}x: {verdict})")
    print()
    p50 = check.latency_ms.get("50", float("nan"))
    p99 = check.latency_ms.get("99", float("nan"))
    print(
        f"tenantguard serve POST /v1/check (memory counters and ledger, {CHECK_TENANTS} tenants):"
        f" {check.rate:,.0f}/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms  non-2xx {check.non_2xx}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="one measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=3, metavar=("VARIANT", "PORT", "REDIS_URL"))
    parser.add_argument("--httpx-load", nargs=3, metavar=("URL", "SECONDS", "CHECK"))
    args = parser.parse_args()
    if args.serve:
        variant, port, redis_url = args.serve
        serve(variant, int(port), redis_url)
    elif args.httpx_load:
        url, seconds, check = args.httpx_load
        httpx_load(url, float(seconds), check == "1")
    else:
        try:
            report(args.seconds, args.rounds)
        except KeyboardInterrupt:
            print("\ninterrupted; servers stopped", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
