"""In-process counter store: the embedded default.

Memory stays bounded without a timer thread or per-key expiry bookkeeping: each table
keeps a ``live`` dict and a ``draining`` dict. Lookups consult both; writes go to
``live``. Every operation also inspects one entry of ``draining`` and moves it to
``live`` if its state still matters, or drops it. When ``draining`` is empty the dicts
rotate. So every key is revisited once per cycle and an expired one is gone within a
cycle, at constant cost per operation and no pauses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from tenantguard.algorithms import EXPIRES, STEPS, Outcome, Step, concurrency
from tenantguard.stores._base import CounterSpec

__all__ = ["MemoryCounters"]

_ROTATE_AT = 64


class _Table:
    __slots__ = ("draining", "expires", "live", "step", "window")

    def __init__(self, algorithm: str, window: float) -> None:
        self.live: dict[str, Any] = {}
        self.draining: dict[str, Any] = {}
        self.window = window
        self.step: Step | None = STEPS.get(algorithm)
        self.expires: Callable[[Any, float], float] = EXPIRES[algorithm]

    def get(self, key: str) -> Any:
        state = self.live.get(key)
        if state is None and self.draining:
            state = self.draining.pop(key, None)
            if state is not None:
                self.live[key] = state
        return state

    def tidy(self, now: float) -> None:
        draining = self.draining
        if draining:
            key, state = draining.popitem()
            if self.expires(state, self.window) > now and key not in self.live:
                self.live[key] = state
        elif len(self.live) >= _ROTATE_AT:
            self.draining, self.live = self.live, {}

    def __len__(self) -> int:
        return len(self.live) + len(self.draining)


class MemoryCounters:
    """Thread-safe; ``apply_now`` is the synchronous core that ``apply`` wraps."""

    def __init__(self) -> None:
        self._tables: dict[str, _Table] = {}
        self._lock = threading.Lock()
        self._tick = 0

    def _table(self, spec: CounterSpec) -> _Table:
        table = self._tables.get(spec.table)
        if table is None:
            table = self._tables[spec.table] = _Table(spec.algorithm, spec.window)
        return table

    def bind(self, specs: Sequence[CounterSpec]) -> tuple[_Table, ...]:
        """The tables ``specs`` count in, resolved once so a cached route skips the lookup."""
        with self._lock:
            return tuple(self._table(spec) for spec in specs)

    def apply_now(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
        tables: Sequence[_Table] | None = None,
    ) -> list[Outcome]:
        if tables is None:
            tables = self.bind(specs)
        outcomes: list[Outcome] = []
        blocked = False
        with self._lock:
            for spec, table, key in zip(specs, tables, keys, strict=True):
                state = table.live.get(key)
                if state is None and table.draining:
                    state = table.get(key)
                step = table.step
                if step is None:
                    outcome = concurrency.acquire(state, now, spec[3], spec[2], cost, lease or "")
                else:
                    outcome = step(state, now, spec[3], spec[2], spec[4], cost)
                outcomes.append(outcome)
                if not outcome[0] and spec[5]:
                    blocked = True
            if not blocked:
                for table, key, outcome in zip(tables, keys, outcomes, strict=True):
                    if outcome[0]:
                        table.live[key] = outcome[1]
            self._tick += 1
            tables[self._tick % len(tables)].tidy(now)
        return outcomes

    def release_now(self, table: str, key: str, lease: str, now: float) -> None:
        with self._lock:
            found = self._tables.get(table)
            if found is None:
                return
            state = found.get(key)
            if state is not None:
                found.live[key] = concurrency.release(state, now, lease)

    async def apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
    ) -> list[Outcome]:
        return self.apply_now(specs, keys, cost, lease, now)

    async def release(self, table: str, key: str, lease: str, now: float) -> None:
        self.release_now(table, key, lease, now)

    async def close(self) -> None:
        return None

    def size(self) -> int:
        """Keys held, live or awaiting their check (for tests and memory benchmarks)."""
        with self._lock:
            return sum(len(table) for table in self._tables.values())
