"""Events, written off the hot path.

A check must never wait on the ledger to record that a tenant crossed a warning
threshold, so ``emit`` only appends to a bounded buffer (when full, the event is dropped
and counted in ``tenantguard_events_dropped_total``: losing a warning beats slowing or
failing a check). A background task writes the buffer in batches and purges events past
the policy's retention, and idempotency keys past theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from prometheus_client import Counter

from tenantguard.ledger._base import EventRecord, Ledger

__all__ = ["EVENTS_DROPPED", "IDEMPOTENCY_RETENTION", "EventSink"]

EVENTS_DROPPED = Counter(
    "tenantguard_events_dropped_total", "Events dropped because the event buffer was full."
)
IDEMPOTENCY_RETENTION = 24 * 3600.0
"""Seconds an idempotency key is remembered: a retry within a day counts once."""

_FLUSH_EVERY = 0.2  # seconds between writes while events keep coming
_PURGE_EVERY = 3600.0


class EventSink:
    def __init__(
        self,
        ledger: Ledger,
        clock: Callable[[], float],
        *,
        retention: float,
        capacity: int = 10_000,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self.retention = retention  # seconds; a policy reload sets it anew
        self._buffer: deque[EventRecord] = deque()
        self._capacity = capacity
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._writing = asyncio.Lock()
        self._purged_at: float | None = None
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Events emitted and not yet written."""
        return len(self._buffer)

    def emit(self, event: EventRecord) -> None:
        """Never blocks and never raises; drops (and counts) when the buffer is full."""
        if len(self._buffer) >= self._capacity:
            self.dropped += 1
            EVENTS_DROPPED.inc()
            return
        self._buffer.append(event)
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a sync caller): the next flush writes it
            self._task = loop.create_task(self._run())

    async def flush(self) -> None:
        """Write everything buffered now (also purges when a purge is due). Returns only
        once every event emitted before the call is written, including a batch the
        background writer had already taken."""
        async with self._writing:
            await self._write()

    async def _write(self) -> None:
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), 500))]
            try:
                await self._ledger.add_events(batch)
            except Exception:  # the ledger is down: keep what fits, try again later
                for event in reversed(batch):
                    if len(self._buffer) < self._capacity:
                        self._buffer.appendleft(event)
                    else:
                        self.dropped += 1
                        EVENTS_DROPPED.inc()
                raise
        now = self._clock()
        if self._purged_at is None or now - self._purged_at >= _PURGE_EVERY:
            self._purged_at = now
            await self._ledger.purge(
                events_before=now - self.retention, keys_before=now - IDEMPOTENCY_RETENTION
            )

    async def _run(self) -> None:
        """Write, then pause a little to gather the next batch; end when idle or closing."""
        while self._buffer and not self._closing.is_set():
            with contextlib.suppress(Exception):
                await self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), _FLUSH_EVERY)

    async def close(self) -> None:
        """Let a write in progress finish (abandoning it would strand a ledger
        connection mid-call), then write what is left."""
        self._closing.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()
