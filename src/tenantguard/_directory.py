"""The tenant directory: every tenant's plan and overrides, held in memory.

A check must never wait on the ledger: a query per tenant (or per expired cache entry)
puts a database round trip on the hot path of exactly the traffic that matters, many
tenants each seen now and then, and turns a ledger outage into refused checks. So the
directory loads every tenant that has a record or an override once (a snapshot and the
feed position it is consistent with), then follows the ledger's change feed: every
write to a tenant's record or overrides appends the tenant to the feed, and a poll
re-reads the state of the tenants named since the last position. A tenant absent from
the directory has no record and no override: it is on the default plan, which takes
no I/O to know.

Memory: one dict entry per tenant with a record or an override. A tenant on its plan
alone is held as the plan's name (one string shared by all tenants of the plan); only
the few with overrides get an ``Overridden`` object. At a million tenants this is the
dict slot plus the id string, about 120 bytes a tenant (``bench/bench_check.py``).

While the ledger does not answer, polls fail and the directory keeps what it has: the
last known state serves every check (``down``), and the next poll that succeeds picks
up every change made meanwhile, since the feed keeps them. A feed position the ledger
no longer keeps (purged, or another database) takes a new snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from tenantguard.errors import StoreError
from tenantguard.ledger import Ledger, OverrideRecord

__all__ = ["Overridden", "TenantDirectory"]

log = logging.getLogger("tenantguard.tenants")


@dataclass(slots=True, eq=False)
class Overridden:
    """A tenant with overrides. ``live`` holds those in force at the last refresh;
    ``until`` is when the next of them expires (then ``live`` is worked out again, by
    the guard's clock, without I/O). ``version`` changes whenever ``live`` does, so
    what was computed from the old set is never reused."""

    plan: str | None
    live: dict[str, OverrideRecord]
    until: float
    version: int


class TenantDirectory:
    """Every tenant's state, following the ledger; see the module docstring.

    ``entries[tenant]`` is the plan's name, or an ``Overridden``; a tenant with neither
    a record nor an override is absent. ``down`` says the last poll failed (the state
    may be stale); ``loaded`` that a snapshot was read at least once.
    """

    def __init__(self, ledger: Ledger, *, interval: float) -> None:
        self.ledger = ledger
        self.interval = interval
        self.entries: dict[str, str | Overridden] = {}
        self.cursor = 0
        self.loaded = False
        self.down = False
        self.confirmed_at: float | None = None
        """When (by the guard's clock) a poll last found the state current."""
        self.next_poll = -math.inf
        self.polling = False
        self.tried = False
        """Whether a first read was attempted (checks wait for that one only)."""
        self.stale_checks = 0
        self._names: dict[str, str] = {}
        self._versions = 0
        self._serial = threading.Lock()
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def entry(self, tenant: str, now: float) -> str | Overridden | None:
        """The tenant's entry, its live overrides brought up to ``now``."""
        entry = self.entries.get(tenant)
        if isinstance(entry, Overridden) and entry.until <= now:
            entry = self._refreshed(tenant, entry, now)
        return entry

    async def load_once(self, now: float) -> None:
        """The first read, awaited by every check that arrives while it runs (they
        would otherwise count tenants on the default plan); after it, only polls."""
        if self.tried and not self.loading:
            return
        await self.refresh(now, first=True)

    async def refresh(self, now: float, *, first: bool = False) -> bool:
        """Bring the directory up to the ledger's feed; False if the ledger failed
        (the directory then keeps what it had and says ``down``).

        One refresh at a time, or a slower poll could apply older state over a newer
        one. A thread lock orders them across threads (``SyncGuard``'s callers, on the
        in-memory ledger where nothing suspends, and its loop); in an event loop, an
        ``asyncio.Lock`` queues the loop's own tasks before it, so no task ever blocks
        its loop's thread on a lock another task of that loop holds.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            with self._serial:
                return await self._refresh(now, first)
        async with self._loop_lock():
            # and against other threads: a caller's, or another loop's. Held across the
            # ledger's await, it blocks only other threads; this loop's tasks queue above
            with self._serial:
                return await self._refresh(now, first)

    @property
    def loading(self) -> bool:
        """The first read is under way (checks arriving now wait for it)."""
        lock = self._lock
        return not self.loaded and lock is not None and lock.locked()

    async def _refresh(self, now: float, first: bool) -> bool:
        if first and self.tried:
            return self.loaded  # another caller's first read finished meanwhile
        self.tried = True
        self.polling = False
        try:
            if not self.loaded:
                await self._load(now)
            else:
                await self._follow(now)
        except Exception as error:  # any failure of the ledger: serve what we have
            if not isinstance(error, StoreError):
                log.exception("reading the tenant directory failed")
            if not self.down:
                log.warning(
                    "the ledger did not answer (%s: %s); %s",
                    type(error).__name__,
                    error,
                    "checks go on with the tenant state last read"
                    if self.loaded
                    else "every tenant is on the default plan until it answers",
                )
            self.down = True
            return False
        if self.down:
            log.warning("the ledger answers again; tenant state is current")
        self.down = False
        self.confirmed_at = now
        return True

    def due(self, now: float) -> bool:
        """Whether a background poll should start now (and, if so, note it started)."""
        if self.polling or now < self.next_poll:
            return False
        self.polling = True
        self.next_poll = now + self.interval
        return True

    def stale_seconds(self, now: float) -> float:
        return math.inf if self.confirmed_at is None else max(0.0, now - self.confirmed_at)

    async def _load(self, now: float) -> None:
        snapshot = await self.ledger.tenant_snapshot()
        entries: dict[str, str | Overridden] = {}
        for tenant, plan in snapshot.plans.items():
            entries[tenant] = self._name(plan)
        for tenant, records in snapshot.overrides.items():
            made = self._make(snapshot.plans.get(tenant), records, now)
            if made is None:
                continue
            entries[tenant] = made
        self.entries = entries
        self.cursor = snapshot.cursor
        self.loaded = True

    async def _follow(self, now: float) -> None:
        while True:
            changes = await self.ledger.tenant_changes(self.cursor)
            if not changes.complete:
                log.warning(
                    "the ledger no longer holds changes after position %d: reading every "
                    "tenant again",
                    self.cursor,
                )
                await self._load(now)
                return
            for tenant, plan in changes.plans.items():
                self._apply(tenant, plan, changes.overrides.get(tenant, ()), now)
            moved = changes.cursor != self.cursor
            self.cursor = changes.cursor
            if not moved:
                return

    def _apply(
        self, tenant: str, plan: str | None, records: Iterable[OverrideRecord], now: float
    ) -> None:
        made = self._make(plan, records, now)
        if made is None and plan is None:
            self.entries.pop(tenant, None)
        else:
            self.entries[tenant] = made if made is not None else self._name(plan or "")

    def _make(
        self, plan: str | None, records: Iterable[OverrideRecord], now: float
    ) -> Overridden | None:
        live = {r.name: r for r in records if r.expires_at is None or r.expires_at > now}
        if not live:
            return None
        expiring = [r.expires_at for r in live.values() if r.expires_at is not None]
        until = min(expiring, default=math.inf)
        self._versions += 1
        return Overridden(None if plan is None else self._name(plan), live, until, self._versions)

    def _refreshed(self, tenant: str, entry: Overridden, now: float) -> str | Overridden | None:
        """``entry`` without its expired overrides. Written back only if it is still the
        tenant's entry: a poll may have put a newer one there meanwhile (from another
        thread), which must not be lost; the answer is then that newer one."""
        made = self._make(entry.plan, entry.live.values(), now)
        after: str | Overridden | None = made if made is not None else entry.plan
        entries = self.entries
        if entries.get(tenant) is not entry:
            return self.entry(tenant, now)
        if after is None:
            entries.pop(tenant, None)
        else:
            entries[tenant] = after
        return after

    def _name(self, plan: str) -> str:
        """One string object per plan name, however many tenants are on it."""
        return self._names.setdefault(plan, plan)

    def _loop_lock(self) -> asyncio.Lock:
        """The running loop's lock (a ``SyncGuard`` runs a loop of its own)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or loop is not self._lock_loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock
