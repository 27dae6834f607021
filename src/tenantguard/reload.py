"""Hot reload: ``PolicyReloader`` watches a policy file and swaps it into a running guard.

It polls rather than subscribing to filesystem events: no extra dependency, and it works
on every filesystem, including a Kubernetes ConfigMap whose update is a symlink swap.
Each poll reads the file in a worker thread (a policy is kilobytes) and hashes it. Only a
changed content hash reloads, so ``touch`` or rewriting the same bytes does nothing, while
an edit that keeps the size and the mtime (coarse timestamps, same-second saves) is still
seen. The bytes hashed are the bytes compiled, so the hash on record always belongs to the
content that was tried.

A file that does not compile leaves the policy in force untouched: the located problems
(``file:line: field: message``) are logged on the ``tenantguard`` logger, kept in
``Guard.reload_error`` and counted in ``tenantguard_policy_reload_total{result="error"}``
(``tenantguard_policy_reload_ok`` drops to 0); the next good save clears them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from asyncio import sleep
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantguard._metrics import POLICY_RELOADS
from tenantguard.errors import PolicyError
from tenantguard.guard import Guard
from tenantguard.policy import Policy, load_policy, parse_policy

__all__ = ["PolicyReloader"]

logger = logging.getLogger("tenantguard")

_UNREADABLE = b""
"""The digest on record for a file that could not be read: never a real hash, so the
file reappearing counts as a change, and repeated failures are reported once."""


class PolicyReloader:
    """Reload ``path`` into ``guard`` whenever its content changes, polling every
    ``interval`` seconds.

    ``start()`` runs the polling task on the running loop and ``stop()`` ends it (or use
    ``async with``, or ``around(app)`` to poll for the lifespan of an ASGI app). The
    first poll loads the file once even if the guard was built from it, so an edit made
    between startup and that poll is never missed. ``reload_now()`` is one poll, for
    tests and for an admin action.
    """

    def __init__(self, guard: Guard, path: str | Path, *, interval: float = 1.0) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.guard = guard
        self.path = Path(path)
        self.interval = interval
        self._digest: bytes | None = None  # of the content last tried; None: nothing yet
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def reload_now(self) -> bool:
        """Poll once: True if a changed file was compiled and is now in force."""
        async with self._lock:
            digest, result = await asyncio.to_thread(self._read, self._digest)
            if result is None:
                return False
            self._digest = digest
            if isinstance(result, Policy):
                self.guard.replace_policy(result)
                self.guard.reload_error = None
                POLICY_RELOADS.labels(result="ok").inc()
                logger.info("policy reloaded from %s", self.path)
                return True
            self.guard.reload_error = result
            POLICY_RELOADS.labels(result="error").inc()
            logger.error("policy %s not reloaded, keeping the one in force:\n%s", self.path, result)
            return False

    def _read(self, known: bytes | None) -> tuple[bytes, Policy | str | None]:
        """The file's digest and, unless it is ``known``, the compiled policy or why it
        does not compile (``None``: unchanged, not compiled)."""
        try:
            data = self.path.read_bytes()
        except OSError:
            data = None
        digest = _UNREADABLE if data is None else hashlib.sha256(data).digest()
        if digest == known:
            return digest, None
        try:
            if data is None:
                return digest, load_policy(self.path)  # words the read error like the CLI
            return digest, parse_policy(data.decode("utf-8"), source=str(self.path))
        except UnicodeDecodeError:
            return digest, f"{self.path}: not UTF-8 text"
        except PolicyError as error:
            return digest, str(error)
        except Exception as error:  # a bug must not end the reloader: report it like a bad file
            logger.exception("policy %s could not be compiled", self.path)
            return digest, f"{self.path}: could not be compiled ({type(error).__name__}: {error})"

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await self.reload_now()
            await sleep(self.interval)

    def start(self) -> None:
        """Start polling on the running event loop (a no-op if already polling)."""
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self.run(), name="tenantguard-policy-reloader")

    async def stop(self) -> None:
        """Stop polling; a reload in progress is abandoned before it swaps anything."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def around(self, app: ASGIApp) -> ASGIApp:
        """``app``, polling while it runs: from its lifespan startup to its shutdown.

        The server's loop is then the reloader's loop, and nothing of the app changes;
        a server that sends no lifespan events (a test client) never starts polling.
        """

        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "lifespan":
                await app(scope, receive, send)
                return

            async def watched() -> Message:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.start()
                elif message["type"] == "lifespan.shutdown":
                    await self.stop()  # before the app closes the guard
                return message

            await app(scope, watched, send)

        return wrapped

    async def __aenter__(self) -> PolicyReloader:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
