"""tenantguard behind HTTP, on realistic traffic: the ASGI middleware against a bare app and
slowapi, ``POST /v1/check`` of ``tenantguard serve`` against bare endpoints, and how
``serve --workers`` scales.

The requests come from ``bench/traffic.py`` (Zipf-skewed org ids, a fresh id in every id
segment), whose description is printed. wrk sends from a Lua script that this file
writes: ``WRK_REQUESTS`` distinct requests from the generator, formatted once per wrk
thread and then cycled (each thread from its own offset), so a server's caches meet tens
of thousands of distinct paths and tenants, as they would in production, and wrk spends
no time building requests. Every server runs in its own process on a free loopback port;
``wrk -t2 -c32`` loads it for ``--seconds`` per round. Variants are measured in turn,
round after round, so drift hits all of them alike; each figure is the best round.

(a) The middleware: one FastAPI app with a route per route template of the traffic
(``/api/v1/users/{idOrLogin}``, ``/api/v1/apps/{id}/users``…), each route its own
handler returning a small JSON; under uvicorn (uvloop, httptools, one worker, no access
log); the tenant in ``X-Tenant-Id``:

* bare: no rate limiting;
* tenantguard on memory / on Redis counters: ``TenantGuardMiddleware`` with the Okta table
  whose every limit is raised to ``CEILING`` (the rules, routes and counting stay; nothing
  is denied, as nothing is by the slowapi variants), its in-process ledger seeded with the
  generator's records and overrides and loaded by ``guard.start()`` at startup;
* slowapi on memory / on Redis: ``1000000/minute`` as a default limit keyed by the tenant
  header, fixed window, ``headers_enabled=True``, its pure-ASGI middleware. slowapi keys
  a default limit by tenant and route handler, which here is tenant and route template.

(b) ``POST /v1/check``: ``tenantguard serve`` on its defaults (memory counters, the SQLite
ledger: a temp file seeded with the generator's records and overrides; the Okta table as
it is, so heavy tenants do get denials: a decision either way) against two bare
endpoints that take the same JSON body, check the same bearer token and answer a
decision-sized JSON: one on FastAPI with a pydantic body, one on Starlette with msgspec
(the stack ``/v1/check`` is moving to). Both bare servers run uvicorn as ``serve`` does;
if ``serve`` writes an access log line per request, so do they (the output says which).
Requests/s and p50/p99 from ``wrk --latency``.

(c) ``serve --workers 2`` against ``--workers 1``, both on Redis counters (so the workers
share them) and the seeded SQLite ledger: the scaling factor. Skipped, saying so, when
``tenantguard serve --help`` has no ``--workers``. The machine has two cores and wrk
runs on them too, so 2.0x is out of reach by construction.

The Redis variants share one ``redis-server`` (``tests/servers.py``), flushed before each
measurement. wrk is required (``scripts/install-servers`` installs it).

Usage: ``python bench/bench_http.py [--quick] [--seconds 4] [--rounds 3]``. The machine
is small and shared, and wrk runs on it too: compare the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import redis
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import RedisServer, free_port  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from traffic import OKTA_POLICY, REALISTIC, Request, Traffic, okta_policy  # noqa: E402

CEILING = 1_000_000
APP_VARIANTS = (
    "bare", "tenantguard-memory", "slowapi-memory", "tenantguard-redis", "slowapi-redis",
)  # fmt: skip
LIMIT_HEADER = {
    "bare": None,
    "tenantguard-memory": "X-Rate-Limit-Limit",
    "tenantguard-redis": "X-Rate-Limit-Limit",
    "slowapi-memory": "X-RateLimit-Limit",
    "slowapi-redis": "X-RateLimit-Limit",
}
CHECK_VARIANTS = ("serve", "fastapi-bare", "starlette-msgspec-bare")
THREADS = 2
CONNECTIONS = 32
WRK_REQUESTS = 50_000
WARMUP = 1.0
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
TOKEN = "bench-token"


# -- the apps of (a), each in its own process -------------------------------------------------


def route_table(traffic: Traffic) -> list[tuple[str, list[str]]]:
    """Each route template of the traffic with its methods, literal segments before
    parameters at every depth (Starlette takes the first route that matches)."""
    methods: dict[str, set[str]] = {}
    for route in traffic.routes:
        methods.setdefault(route.template, set()).add(route.method)

    def order(template: str) -> tuple[tuple[int, str], ...]:
        return tuple((segment.startswith("{"), segment) for segment in template.split("/"))

    return [(template, sorted(methods[template])) for template in sorted(methods, key=order)]


def _handler(index: int) -> Any:
    """A route's own handler: slowapi keys a default limit by handler name."""

    async def handler() -> dict[str, object]:
        return {"items": [], "ok": True}

    handler.__name__ = handler.__qualname__ = f"route_{index}"
    return handler


def build_app(variant: str, redis_url: str) -> Any:
    """The FastAPI app of (a), wrapped as ``variant`` says."""
    from fastapi import FastAPI

    from tenantguard import Guard
    from tenantguard.ledger import MemoryLedger
    from tenantguard.middleware import TenantGuardMiddleware

    traffic = Traffic(REALISTIC)
    guard: Guard | None = None
    if variant.startswith("tenantguard"):
        policy = okta_policy(ceiling=CEILING)
        ledger = MemoryLedger()
        asyncio.run(traffic.seed_ledger(ledger, policy))
        counters = "memory" if variant.endswith("memory") else f"{redis_url}?clock=server"
        guard = Guard(policy, counters=counters, ledger=ledger)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if guard is not None and hasattr(guard, "start"):
            await guard.start()  # the tenant directory, where the engine has one
        yield
        if guard is not None:
            await guard.close()

    app = FastAPI(lifespan=lifespan)
    for index, (template, methods) in enumerate(route_table(traffic)):
        app.add_api_route(template, _handler(index), methods=methods)
    if guard is not None:
        return TenantGuardMiddleware(app, guard, tenant="header:X-Tenant-Id")
    if variant.startswith("slowapi"):
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware
        from starlette.requests import Request as StarletteRequest

        def tenant_key(request: StarletteRequest) -> str:
            return request.headers.get("x-tenant-id", "")

        app.state.limiter = Limiter(
            key_func=tenant_key,
            default_limits=[f"{CEILING}/minute"],
            headers_enabled=True,
            strategy="fixed-window",
            storage_uri="memory://" if variant.endswith("memory") else redis_url,
        )
        app.add_middleware(SlowAPIASGIMiddleware)
    return app


# -- the bare /v1/check endpoints of (b) -------------------------------------------------------


class CheckModel(BaseModel):
    """``POST /v1/check``'s body, as the FastAPI endpoint validates it."""

    tenant: str
    method: str
    path: str
    client: str | None = None
    ip: str | None = None
    user: str | None = None
    headers: dict[str, str] | None = None
    cost: int = 1


class CheckStruct(msgspec.Struct, forbid_unknown_fields=True):
    """The same body, as the Starlette endpoint decodes it."""

    tenant: str
    method: str
    path: str
    client: str | None = None
    ip: str | None = None
    user: str | None = None
    headers: dict[str, str] | None = None
    cost: int = 1


def decision_like(tenant: str) -> dict[str, object]:
    """An answer the size and shape of an allowed decision (about 500 bytes of JSON)."""
    reset = int(time.time()) // 60 * 60 + 60
    return {
        "allowed": True, "status": 200, "tenant": tenant, "plan": "developer-free",
        "rule": "user-get", "limit": 100, "remaining": 99, "reset": reset,
        "retry_after": None, "reason": None, "degraded": False,
        "headers": {
            "X-Rate-Limit-Limit": "100", "X-Rate-Limit-Remaining": "99",
            "X-Rate-Limit-Reset": str(reset),
        },
        "checks": [{
            "rule": "user-get", "group": "endpoint", "algorithm": "fixed-window",
            "outcome": "allowed", "limit": 100, "remaining": 99, "reset": reset,
            "shadow": False, "reason": None,
        }],
        "lease": None,
    }  # fmt: skip


_BEARER = f"Bearer {TOKEN}"


def build_check_app(variant: str) -> Any:
    if variant == "fastapi-bare":
        from fastapi import FastAPI, Header, HTTPException

        app = FastAPI()

        @app.post("/v1/check")
        async def check(body: CheckModel, authorization: str = Header("")) -> dict[str, object]:
            if not hmac.compare_digest(authorization, _BEARER):
                raise HTTPException(401)
            return decision_like(body.tenant)

        return app
    from starlette.applications import Starlette
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import Response
    from starlette.routing import Route

    decode = msgspec.json.Decoder(CheckStruct).decode
    encode = msgspec.json.Encoder().encode

    async def endpoint(request: StarletteRequest) -> Response:
        if not hmac.compare_digest(request.headers.get("authorization", ""), _BEARER):
            return Response(status_code=401)
        body = decode(await request.body())
        return Response(encode(decision_like(body.tenant)), media_type="application/json")

    return Starlette(routes=[Route("/v1/check", endpoint, methods=["POST"])])


def serve(kind: str, variant: str, port: int, redis_url: str, access_log: bool) -> None:
    import uvicorn

    if kind == "app":
        uvicorn.run(
            build_app(variant, redis_url), host="127.0.0.1", port=port, loop="uvloop",
            http="httptools", workers=1, log_level="warning", access_log=False,
        )  # fmt: skip
    else:  # as ``tenantguard serve`` runs uvicorn
        uvicorn.run(build_check_app(variant), host="127.0.0.1", port=port, access_log=access_log)


# -- processes -------------------------------------------------------------------------------


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
                    if client.get(path).status_code < 500:
                        return
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.name} not up in {STARTUP_TIMEOUT:g} s")
                time.sleep(0.1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return "\n".join(self.log_text().splitlines()[-20:])

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
def running(
    servers: Sequence[tuple[str, list[str], dict[str, str] | None, str]], directory: Path
) -> Iterator[dict[str, Server]]:
    """``(name, argv without the port, env, readiness path)`` each started on a free port
    (``--port`` appended), all stopped at the end."""
    started: dict[str, Server] = {}
    try:
        for name, argv, env, _ in servers:
            port = free_port()
            started[name] = Server(name, [*argv, "--port", str(port)], port, directory, env)
        for name, _, _, ready in servers:
            started[name].wait_ready(ready)
        yield started
    finally:
        for server in started.values():
            server.stop()


def helper_argv(kind: str, variant: str, redis_url: str, *, access_log: bool = False) -> list[str]:
    """This file, serving one app of (a) (``kind`` app) or (b) (``kind`` check)."""
    log = "1" if access_log else "0"
    return [sys.executable, __file__, "--serve", kind, variant, redis_url, log]


def serve_argv(ledger: str, counters: str = "memory", workers: int | None = None) -> list[str]:
    argv = [
        str(Path(sys.executable).parent / "tenantguard"), "serve",
        "--policy", str(OKTA_POLICY), "--ledger", ledger, "--counters", counters,
    ]  # fmt: skip
    return argv if workers is None else [*argv, "--workers", str(workers)]


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGUARD_")}
    env["TENANTGUARD_ADMIN_TOKEN"] = TOKEN
    return env


def serve_has_workers() -> bool:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tenantguard"), "serve", "--help"],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    return "--workers" in done.stdout


# -- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    rate: float
    requests: int
    non_2xx: int = 0
    errors: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)

    def percentile(self, percent: str) -> float:
        return self.latency_ms.get(percent, float("nan"))


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


def run_wrk(url: str, seconds: float, script: Path) -> Load:
    argv = [
        "wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s",
        "--latency", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(done.stdout)


_LUA = """\
-- {count:,} distinct requests from bench/traffic.py, formatted once per thread and cycled;
-- each of the {threads} threads starts at its own offset.
local data = [==[
{data}
]==]
local requests = {{}}
local index = 0
local threads = 0

function setup(thread)
  thread:set("offset", threads)
  threads = threads + 1
end

function init(args)
  for method, path, tenant in data:gmatch("(%S+) (%S+) (%S+)\\n") do
{build}
  end
  data = nil
  index = math.floor((offset or 0) * #requests / {threads})
end

function request()
  index = index % #requests + 1
  return requests[index]
end
"""
_BUILD_GET = """\
    requests[#requests + 1] = wrk.format(method, path, {["X-Tenant-Id"] = tenant})"""
_BUILD_CHECK = """\
    local body = string.format('{"tenant":"%s","method":"%s","path":"%s"}', tenant, method, path)
    requests[#requests + 1] = wrk.format("POST", "/v1/check", {
      ["Content-Type"] = "application/json", ["Authorization"] = "Bearer TOKEN"}, body)"""


def wrk_script(requests: Sequence[Request], *, check: bool) -> str:
    """A wrk script cycling ``requests``: as they are (tenant in ``X-Tenant-Id``), or as
    ``POST /v1/check`` bodies. Paths and ids are base62 and ``/`` only: no quoting."""
    data = "\n".join(f"{r.method} {r.path} {r.tenant}" for r in requests)
    build = _BUILD_CHECK.replace("TOKEN", TOKEN) if check else _BUILD_GET
    return _LUA.format(count=len(requests), threads=THREADS, data=data, build=build)


# -- the phases ------------------------------------------------------------------------------


def measure_in_turn(
    servers: dict[str, Server],
    names: Sequence[str],
    path: str,
    script: Path,
    seconds: float,
    rounds: int,
    control: redis.Redis,
) -> dict[str, Load]:
    """A warm-up each, then ``rounds`` rounds of every variant in turn; the best round."""
    for name in names:
        run_wrk(servers[name].url + path, WARMUP, script)
    results: dict[str, list[Load]] = {name: [] for name in names}
    for number in range(1, rounds + 1):
        for name in names:
            control.flushall()
            result = run_wrk(servers[name].url + path, seconds, script)
            results[name].append(result)
            print(
                f"  round {number} {name:<24} {result.rate:>9,.0f}/s"
                f"  p50 {result.percentile('50'):.2f} ms  p99 {result.percentile('99'):.2f} ms"
                f"  non-2xx {result.non_2xx}  socket errors {result.errors}",
                flush=True,
            )
    return {name: max(loads, key=lambda load: load.rate) for name, loads in results.items()}


def middleware_phase(
    requests: Sequence[Request], redis_url: str, directory: Path, options: Options,
    control: redis.Redis,
) -> dict[str, Load]:  # fmt: skip
    script = directory / "app.lua"
    script.write_text(wrk_script(requests, check=False))
    first = requests[0]
    servers = [(v, helper_argv("app", v, redis_url), None, "/openapi.json") for v in APP_VARIANTS]
    with running(servers, directory) as started:
        with httpx.Client(timeout=5.0, headers={"X-Tenant-Id": first.tenant}) as client:
            for variant, header in LIMIT_HEADER.items():
                response = client.request(first.method, started[variant].url + first.path)
                if response.status_code != 200:
                    raise RuntimeError(f"{variant}: {response.status_code} {response.text}")
                if header is not None and header not in response.headers:
                    raise RuntimeError(f"{variant}: no {header} in {response.headers}")
        print("(a) the middleware: GET and friends on the app's routes", flush=True)
        return measure_in_turn(
            started, APP_VARIANTS, "", script, options.seconds, options.rounds, control
        )


def check_phase(
    requests: Sequence[Request], ledger: str, directory: Path, options: Options,
    control: redis.Redis,
) -> tuple[dict[str, Load], bool]:  # fmt: skip
    """(b); also whether ``serve`` logs each request (the bare servers then do too)."""
    script = directory / "check.lua"
    script.write_text(wrk_script(requests, check=True))
    body = {"tenant": requests[0].tenant, "method": requests[0].method, "path": requests[0].path}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running([("serve", serve_argv(ledger), serve_env(), "/healthz")], directory) as one:
        answer = httpx.post(one["serve"].url + "/v1/check", json=body, headers=auth, timeout=5)
        if answer.status_code != 200 or "allowed" not in answer.json():
            raise RuntimeError(f"serve /v1/check: {answer.status_code} {answer.text}")
        time.sleep(0.5)
        access_log = "POST /v1/check" in one["serve"].log_text()
        bare = [
            (name, helper_argv("check", name, "", access_log=access_log), None, "/v1/check")
            for name in CHECK_VARIANTS[1:]
        ]
        with running(bare, directory) as others:
            servers = {**one, **others}
            for name in CHECK_VARIANTS[1:]:
                answer = httpx.post(
                    servers[name].url + "/v1/check", json=body, headers=auth, timeout=5
                )
                if answer.status_code != 200 or "allowed" not in answer.json():
                    raise RuntimeError(f"{name}: {answer.status_code} {answer.text}")
            print(
                "(b) POST /v1/check"
                + (" (serve logs every request; so do the bare servers)" if access_log else ""),
                flush=True,
            )
            loads = measure_in_turn(
                servers, CHECK_VARIANTS, "/v1/check", script, options.seconds, options.rounds,
                control,
            )  # fmt: skip
    return loads, access_log


def workers_phase(
    ledger: str, redis_url: str, directory: Path, options: Options, control: redis.Redis
) -> dict[int, Load] | None:
    """(c), or ``None`` when ``serve`` has no ``--workers`` yet."""
    if not serve_has_workers():
        return None
    script = directory / "check.lua"
    loads: dict[int, Load] = {}
    print("(c) serve --workers on Redis counters", flush=True)
    for workers in (1, 2):
        argv = serve_argv(ledger, f"{redis_url}?clock=server", workers)
        name = f"serve-{workers}w"
        with running([(name, argv, serve_env(), "/healthz")], directory) as one:
            best = measure_in_turn(
                one, [name], "/v1/check", script, options.seconds, options.rounds, control
            )
            loads[workers] = best[name]
    return loads


# -- the report ------------------------------------------------------------------------------


class Options:
    def __init__(self, *, seconds: float, rounds: int) -> None:
        self.seconds = seconds
        self.rounds = rounds


def report(options: Options) -> None:
    started = time.perf_counter()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: scripts/install-servers installs it")
    traffic = Traffic(REALISTIC)
    requests = traffic.requests(WRK_REQUESTS)
    print(traffic.describe(requests), flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="tenantguard-bench-http-") as tmp,
        RedisServer() as redis_server,
    ):
        directory = Path(tmp)
        ledger = f"sqlite:///{directory / 'serve.db'}"
        asyncio.run(traffic.seed_sqlite(ledger, okta_policy()))
        control: redis.Redis = redis_server.client()
        try:
            print(
                f"wrk -t{THREADS} -c{CONNECTIONS} -d{options.seconds:g}s cycling"
                f" {len(requests):,} distinct requests; redis-server"
                f" {control.info('server')['redis_version']}; best of {options.rounds} rounds",
                flush=True,
            )
            apps = middleware_phase(requests, redis_server.url, directory, options, control)
            checks, access_log = check_phase(requests, ledger, directory, options, control)
            workers = workers_phase(ledger, redis_server.url, directory, options, control)
        finally:
            control.close()
    print()
    print(traffic.describe(requests))
    print(f"wrk cycles {len(requests):,} distinct requests from the generator")
    print_apps(apps)
    print_checks(checks, access_log)
    print_workers(workers)
    print(f"total {time.perf_counter() - started:.0f} s")


def print_apps(best: dict[str, Load]) -> None:
    bare = best["bare"].rate
    print()
    print(
        f"(a) requests/s, a FastAPI app with a route per route template, limits at {CEILING:,}"
        " (nothing denied)"
    )
    print(
        f"{'variant':<20} | {'requests/s':>10} | {'vs bare':>7} | {'p50 ms':>6} | {'p99 ms':>6} |"
        f" {'non-2xx':>7}"
    )
    for variant in APP_VARIANTS:
        result = best[variant]
        print(
            f"{variant:<20} | {result.rate:>10,.0f} | {result.rate / bare:>6.2f}x |"
            f" {result.percentile('50'):>6.2f} | {result.percentile('99'):>6.2f} |"
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
    for name, ratio, target in targets:
        verdict = "met" if ratio >= target else "NOT met"
        print(f"  {name:<36} {ratio:>6.2f}x  (target >= {target:g}x: {verdict})")


def print_checks(best: dict[str, Load], access_log: bool) -> None:
    print()
    print(
        "(b) POST /v1/check: serve on its defaults (memory counters, SQLite ledger seeded with"
        " the generator's records) vs bare endpoints with the same body and token"
        + ("; every server writes an access log line per request" if access_log else "")
    )
    print(
        f"{'variant':<24} | {'requests/s':>10} | {'p50 ms':>6} | {'p99 ms':>6} |"
        f" {'vs FastAPI bare':>15} | {'vs Starlette bare':>17} | {'non-2xx':>7}"
    )
    fastapi = best["fastapi-bare"].rate
    starlette = best["starlette-msgspec-bare"].rate
    for name in CHECK_VARIANTS:
        result = best[name]
        print(
            f"{name:<24} | {result.rate:>10,.0f} | {result.percentile('50'):>6.2f} |"
            f" {result.percentile('99'):>6.2f} | {result.rate / fastapi:>14.2f}x |"
            f" {result.rate / starlette:>16.2f}x | {result.non_2xx:>7}"
        )


def print_workers(loads: dict[int, Load] | None) -> None:
    print()
    if loads is None:
        print(
            "(c) serve --workers: skipped, `tenantguard serve --help` has no --workers option"
            " in this engine state"
        )
        return
    print("(c) POST /v1/check, serve on Redis counters and the SQLite ledger")
    for workers, load in loads.items():
        print(
            f"  --workers {workers}: {load.rate:>9,.0f}/s  p50 {load.percentile('50'):.2f} ms"
            f"  p99 {load.percentile('99'):.2f} ms  non-2xx {load.non_2xx}"
        )
    print(
        f"  scaling 2 workers / 1: {loads[2].rate / loads[1].rate:.2f}x (2 cores, shared with wrk)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="one measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s each")
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "VARIANT", "REDIS_URL", "ACCESS_LOG"))
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        kind, variant, redis_url, access_log = args.serve
        serve(kind, variant, args.port, redis_url, access_log == "1")
        return
    options = Options(seconds=args.seconds, rounds=args.rounds)
    if args.quick:
        options = Options(seconds=2.0, rounds=1)
    try:
        report(options)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
