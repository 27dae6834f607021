"""``serve --workers N``: N processes serving one port, for the cores one process cannot use.

The port. Each worker listens on a socket of its own, bound with ``SO_REUSEPORT``, and
the kernel spreads new connections over the listening sockets by a hash of each
connection's addresses: no process hands connections out, and none is woken for a
connection another takes. A worker that dies leaves the group with its socket; the
connections already queued on that socket are reset, later ones go to the others. The
parent binds a socket of the group too and never listens on it, so the port stays
the service's while workers come and go, and a port already taken is reported before
any worker starts. (Linux balances this way; on macOS the last socket bound takes
everything.)

Why not uvicorn's own ``--workers``: it wants the app as an import string and leaves
the rest to be passed through the environment. Here the parent validates the
configuration, generates the token once and hands each worker everything it needs,
token included, through the pipe that starts it (``spawn``), not its environment.

The workers. Each is a fresh interpreter (``spawn``: no state, lock or thread of the
parent's carried over) that builds its own app with ``build`` (its own guard, counter
store and ledger connections, policy reloader) and serves it with uvicorn. A worker
that dies after it was serving is replaced; one that dies before (the app cannot be
built, or its lifespan fails) stops the service, as the same configuration would fail
again. A worker whose parent is gone stops too.

Metrics. ``PROMETHEUS_MULTIPROC_DIR`` points at a temporary directory, made before the
workers start and removed when the service stops; ``_metrics.WorkerMetrics`` sums the
workers' figures there, and ``worker_exited`` keeps the counts of the workers that end.

Stopping. SIGTERM or SIGINT to the parent sends SIGTERM to every worker, which finishes
its requests in flight, closes its guard and exits; a worker still running after
``STOP_TIMEOUT`` seconds is killed. The parent then exits 0.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantguard._metrics import worker_exited

__all__ = ["STOP_TIMEOUT", "AppBuilder", "reserve_port", "run_workers"]

STOP_TIMEOUT = 30.0
"""Seconds a worker has to finish its requests in flight after SIGTERM."""
_POLL = 0.25
"""Seconds between the parent's looks at its signals and workers."""
_RETRY_DELAY = 1.0
"""Seconds before replacing a replacement that died before it was serving."""

AppBuilder = Callable[[Path], ASGIApp]
"""Builds a worker's app, given the metrics directory; called in the worker, so it
must pickle (a module-level function, or a ``functools.partial`` of one)."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not yet listening.

    ``OSError`` says why the port cannot be had; ``RuntimeError`` that this platform
    cannot share a port."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("this platform has no SO_REUSEPORT: --workers needs it")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Worker:
    process: SpawnProcess
    ready: Event
    replacement: bool


def run_workers(
    build: AppBuilder,
    *,
    host: str,
    port: int,
    workers: int,
    reserved: socket.socket,
    say: Callable[[str], None],
) -> int:
    """Serve ``host:port`` from ``workers`` processes until SIGTERM or SIGINT; the exit
    status: 0 once stopped by a signal, 1 when a worker could not start.

    ``reserved`` is the parent's socket from ``reserve_port``, closed here at the end.
    """
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    directory = tempfile.mkdtemp(prefix="tenantguard-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # read by prometheus_client when a worker imports it: it then counts in this directory
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory

    def start(*, replacement: bool) -> _Worker:
        ready = context.Event()
        process = context.Process(
            target=_serve,
            args=(build, host, port, directory, ready, os.getpid()),
            name="tenantguard-worker",
        )
        process.start()
        return _Worker(process, ready, replacement)

    pool: list[_Worker] = []
    try:
        pool.extend(start(replacement=False) for _ in range(workers))
        while not stop.is_set():
            wait([worker.process.sentinel for worker in pool], timeout=_POLL)
            for index, worker in enumerate(pool):
                process = worker.process
                if stop.is_set() or process.exitcode is None:
                    continue
                process.join()
                pid = process.pid or 0
                worker_exited(directory, pid)
                if not worker.ready.is_set():
                    if not worker.replacement:
                        say(f"worker {pid} exited before serving (exit code {process.exitcode})")
                        return 1
                    if stop.wait(_RETRY_DELAY):  # a replacement failing: do not spin
                        break
                say(f"worker {pid} exited (exit code {process.exitcode}); starting another")
                pool[index] = start(replacement=True)
        return 0
    finally:
        _stop(pool)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)
        reserved.close()


def _stop(pool: list[_Worker]) -> None:
    for worker in pool:
        if worker.process.exitcode is None:
            worker.process.terminate()  # SIGTERM: uvicorn's graceful shutdown
    deadline = time.monotonic() + STOP_TIMEOUT
    for worker in pool:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()


# in the worker ------------------------------------------------------------------------


def _serve(
    build: AppBuilder, host: str, port: int, directory: str, ready: Event, parent: int
) -> None:
    """A worker's life: its own socket in the port's group, its own app, uvicorn."""
    # uvicorn finishes gracefully on these, then raises them again: end with status 0
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, _exit_cleanly)
    sock = reserve_port(host, port)
    app = _announced(build(Path(directory)), ready, parent)
    uvicorn.Server(uvicorn.Config(app, lifespan="on")).run(sockets=[sock])


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _announced(app: ASGIApp, ready: Event, parent: int) -> ASGIApp:
    """``app``, telling the parent once its lifespan started (so a worker that dies
    before is known not to start), and stopping if the parent disappears."""

    async def announced(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        orphaned: asyncio.Task[None] | None = None

        async def sent(message: Message) -> None:
            nonlocal orphaned
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                ready.set()
                orphaned = asyncio.get_running_loop().create_task(_watch(parent))

        try:
            await app(scope, receive, sent)
        finally:
            if orphaned is not None:
                orphaned.cancel()

    return announced


async def _watch(parent: int) -> None:
    """Stop this worker, gracefully, once its parent is gone (killed, say): nothing
    would replace it, stop it or clean up after it."""
    while os.getppid() == parent:
        await asyncio.sleep(_POLL * 4)
    signal.raise_signal(signal.SIGTERM)
