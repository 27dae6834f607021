"""A synchronous front to a ``Guard`` (``SyncGuard``) and a WSGI middleware on it.

There is no sync twin of the engine: ``SyncGuard`` runs the guard's own coroutines.

- **In the caller's thread** first, with no event loop: ``coro.send(None)``. With
  in-process counters (memory) a check never awaits anything that suspends (tenant
  state is in memory once read), so the coroutine finishes in that
  one step and costs what a plain function call costs: no loop, no thread hop.
- **On the SyncGuard's own event-loop thread** when the call needs real I/O (an SQL
  ledger, Redis), via ``asyncio.run_coroutine_threadsafe``. One loop for all callers,
  so the Redis connection pool and its auto-pipelining are shared by every WSGI thread.

The trade-off: asyncio I/O needs a running loop, and the caller's thread has none. The
engine touches the loop only at its first I/O, before it has counted or written
anything; there, without a loop, that touch raises, and the call is started again on
the loop thread. So a call that does I/O computes its pure prefix (route and cache
lookups) twice and pays a thread hop (tens of microseconds); a call that does not never
leaves the caller's thread. A poll of the tenant directory that falls due during a
check in the caller's thread is handed to the loop thread (``Guard.background``); the
check does not wait for it. A coroutine that merely pauses (a bare ``yield``) is not
restarted but finished on the loop thread. Checks and releases of a guard whose
counters are not in process (Redis) always do I/O, so they go to the loop at once
(a first attempt would also spend the circuit breaker's half-open probe).

A ``SyncGuard`` is thread-safe (the in-process stores lock; the loop is one thread) and
must not be called from a running event loop: it blocks; await the ``Guard`` there.
Events emitted by an in-thread call are written by the loop thread soon after.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from concurrent.futures import Future
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from tenantguard._errors_style import Answer, refusal
from tenantguard.errors import StoreError
from tenantguard.middleware import TenantSpec, failure, tenant_resolver

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo

    from tenantguard.guard import Guard
    from tenantguard.overrides import Overrides
    from tenantguard.quotas import Quotas
    from tenantguard.tenants import Tenants

__all__ = ["SyncGuard", "SyncOverrides", "SyncQuotas", "SyncTenants", "TenantGuardWSGI"]

P = ParamSpec("P")
T = TypeVar("T")
_RESTART = object()


class SyncGuard:
    """``Guard``'s API, called without ``await``: ``check``, ``release``, ``limits``,
    ``tenants``, ``quotas``, ``overrides`` take the same arguments and return the same
    values (and raise the same errors) as the guard's."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._flush: Future[None] | None = None
        self._closed = False
        # polls of the tenant directory that a check in the caller's thread finds due
        guard.background = self._in_background
        counters_local = guard.counters_in_process  # see the docstring
        self.check = self.wrap(guard.check, inline=counters_local)
        self.release = self.wrap(guard.release, inline=counters_local)
        self.limits = self.wrap(guard.limits)
        self.tenants = SyncTenants(self, guard.tenants)
        self.quotas = SyncQuotas(self, guard.quotas)
        self.overrides = SyncOverrides(self, guard.overrides)

    def wrap(
        self, method: Callable[P, Coroutine[Any, Any, T]], *, inline: bool = True
    ) -> Callable[P, T]:
        """``method`` (a coroutine function of the guard), callable from sync code."""

        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return self._run(lambda: method(*args, **kwargs), inline)

        call.__doc__ = method.__doc__
        call.__name__ = getattr(method, "__name__", "call")
        return call

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closed:  # a check after close(): no new loop thread for a poll
            coro.close()
            return
        asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def close(self) -> None:
        """Close the guard (pending events are written, stores closed), end the loop."""
        self._closed = True
        self._on_loop(self._close())
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    async def _close(self) -> None:
        await self.guard.close()
        await asyncio.get_running_loop().shutdown_default_executor()

    def __enter__(self) -> SyncGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]], inline: bool) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("SyncGuard blocks: in async code, await the Guard itself")
        if not inline:
            return self._on_loop(make())
        coro = make()
        try:
            paused = coro.send(None)
        except StopIteration as done:
            self._write_events()
            result: T = done.value
            return result
        except RuntimeError as error:
            if "event loop" not in str(error):
                raise
            # it reached real I/O before changing anything (outside the except block,
            # so the retry's own errors do not chain to this one): start again on the loop
            paused = _RESTART
        if paused is _RESTART:
            return self._on_loop(make())
        return self._on_loop(_Resumed(coro, paused).finish())

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop()).result()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="tenantguard-sync", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _write_events(self) -> None:
        """Events an in-thread call emitted wait in the sink (it had no loop to write
        them from): have the loop thread write them, one flush at a time."""
        if self.guard.events.pending and (self._flush is None or self._flush.done()):
            self._flush = asyncio.run_coroutine_threadsafe(
                self.guard.events.flush(), self._ensure_loop()
            )


class SyncTenants:
    def __init__(self, sync: SyncGuard, tenants: Tenants) -> None:
        self.upsert = sync.wrap(tenants.upsert)
        self.get = sync.wrap(tenants.get)
        self.delete = sync.wrap(tenants.delete)
        self.list = sync.wrap(tenants.list)


class SyncQuotas:
    def __init__(self, sync: SyncGuard, quotas: Quotas) -> None:
        self.acquire = sync.wrap(quotas.acquire)
        self.release = sync.wrap(quotas.release)
        self.set_usage = sync.wrap(quotas.set_usage)
        self.get = sync.wrap(quotas.get)


class SyncOverrides:
    def __init__(self, sync: SyncGuard, overrides: Overrides) -> None:
        self.set = sync.wrap(overrides.set)
        self.remove = sync.wrap(overrides.remove)
        self.list = sync.wrap(overrides.list)


class _Resumed(Generic[T]):
    """A coroutine that paused in the caller's thread, finished as a task on the loop:
    the task first sees the pause the coroutine made, then drives the coroutine on."""

    def __init__(self, coro: Coroutine[Any, Any, T], paused: Any) -> None:
        self.coro = coro
        self.paused = paused

    async def finish(self) -> T:
        return await self

    def __await__(self) -> Generator[Any, None, T]:
        try:
            yield self.paused
        except BaseException:
            self.coro.close()
            raise
        return (yield from self.coro.__await__())


class TenantGuardWSGI:
    """The WSGI twin of ``TenantGuardMiddleware`` in behaviour (same ``tenant`` options,
    headers, error bodies), running on a ``SyncGuard``. A callable ``tenant`` receives
    the WSGI environ. A concurrency lease is released once, when the server closes the
    response iterable, or at once if the app raises."""

    def __init__(
        self,
        app: WSGIApplication,
        guard: SyncGuard,
        *,
        tenant: TenantSpec[WSGIEnvironment],
        default_tenant: str | None = None,
        client_header: str | None = None,
    ) -> None:
        self.app = app
        self.guard = guard
        self.tenant = tenant_resolver(tenant, default_tenant)
        self.client_header = (client_header or "").lower()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        headers, path = _request(environ)
        tenant = self.tenant(environ, headers, path)
        if tenant is None:
            return self.app(environ, start_response)
        try:
            decision = self.guard.check(
                tenant, environ["REQUEST_METHOD"], path, headers=headers,
                client=headers.get(self.client_header), ip=environ.get("REMOTE_ADDR") or None,
            )  # fmt: skip
        except (ValueError, StoreError) as error:
            if (answer := failure(self.guard.guard.policy, error)) is None:
                return self.app(environ, start_response)
            return _reply(start_response, answer)
        if not decision.allowed:
            style = self.guard.guard.policy.document.errors  # read per refusal: hot reload
            return _reply(start_response, refusal(style, decision))
        extra = list(decision.headers.items())

        def start_with_headers(
            status: str, sent: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
        ) -> Callable[[bytes], object]:
            return start_response(status, [*sent, *extra], exc_info)

        lease = decision.lease
        if lease is None:
            return self.app(environ, start_with_headers)
        try:
            body = self.app(environ, start_with_headers)
        except BaseException:
            self.guard.release(lease)
            raise
        return _ReleasingBody(body, lambda: self.guard.release(lease))


def _request(environ: WSGIEnvironment) -> tuple[dict[str, str], str]:
    """Lower-cased request headers, and the path decoded as UTF-8 (PEP 3333 hands it
    over as latin-1)."""
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    path: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    with contextlib.suppress(UnicodeEncodeError):  # unless a server already decoded it
        path = path.encode("latin-1").decode("utf-8", "replace")
    return headers, path


class _ReleasingBody:
    """The app's response iterable; closing it (the server always does) releases."""

    def __init__(self, body: Iterable[bytes], release: Callable[[], None]) -> None:
        self.body = body
        self.release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        release, self.release = self.release, None
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            if release is not None:
                release()


def _reply(start_response: StartResponse, answer: Answer) -> list[bytes]:
    status, headers, body = answer
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]
