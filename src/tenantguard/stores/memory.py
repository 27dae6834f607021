"""In-process counter store: the embedded default.

Memory stays bounded without a timer thread or per-key expiry bookkeeping: each table
keeps a ``live`` dict and a ``draining`` dict. Lookups consult both; writes go to
``live``. While ``draining`` has entries, every operation inspects one of them and moves
it back to ``live`` if its state still matters, or drops it. Once ``live`` has grown to
twice the keys that survived the last drain, the dicts rotate and a new drain begins. So the
table never holds much more than twice its working set, expired keys go within one
cycle, and the cost is constant per operation with no pauses; a table whose key set is
stable stops draining altogether.
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
    __slots__ = ("draining", "expires", "floor", "kept", "live", "step", "window")

    def __init__(self, algorithm: str, window: float) -> None:
        self.live: dict[str, Any] = {}
        self.draining: dict[str, Any] = {}
        self.window = window
        self.floor = _ROTATE_AT // 2
        self.kept = 0  # keys of the current drain found alive again
        self.step: Step | None = STEPS.get(algorithm)
        self.expires: Callable[[Any, float], float] = EXPIRES[algorithm]

    def get(self, key: str) -> Any:
        state = self.live.get(key)
        if state is None and self.draining:
            state = self.draining.pop(key, None)
            if state is not None:
                self.live[key] = state
                self.kept += 1
        return state

    def tidy(self, now: float) -> None:
        """Check one draining entry; rotate when ``live`` has doubled since the last drain."""
        draining = self.draining
        if draining:
            key, state = draining.popitem()
            if self.expires(state, self.window) > now and key not in self.live:
                self.live[key] = state
                self.kept += 1
            if not draining:
                # only keys that outlived the drain set the bar, not keys new since it began
                self.floor = max(self.kept, _ROTATE_AT // 2)
                self.kept = 0
        elif len(self.live) >= 2 * self.floor:
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
        """``apply`` without the coroutine; ``tables`` from ``bind`` skips a lookup."""
        if tables is None:
            tables = self.bind(specs)
        if len(specs) == 2 and tables[0].step and tables[1].step and tables[0] is not tables[1]:
            return self._apply_two(specs, tables, keys, cost, now)  # type: ignore[arg-type]
        outcomes: list[Outcome] = []
        previous: list[Any] = []
        self._lock.acquire()  # not `with`: half the cost, on every check
        try:
            # write as we go, since nearly every check admits; undo if a spec denies
            for spec, table, key in zip(specs, tables, keys):  # noqa: B905 - equal by construction
                live = table.live
                state = live.get(key)
                if state is None and table.draining:
                    state = table.get(key)
                step = table.step
                if step is None:
                    outcome = concurrency.acquire(state, now, spec[3], spec[2], cost, lease or "")
                else:
                    outcome = step(state, now, spec[3], spec[2], spec[4], cost)
                outcomes.append(outcome)
                if outcome[0]:
                    previous.append(state)
                    live[key] = outcome[1]
                elif spec[5]:
                    self._undo(specs, tables, keys, outcomes, previous, cost, lease, now)
                    break
            self._tick += 1
            table = tables[self._tick % len(tables)]
            if table.draining or len(table.live) >= 2 * table.floor:
                table.tidy(now)
        finally:
            self._lock.release()
        return outcomes

    def _apply_two(
        self,
        specs: Sequence[CounterSpec],
        tables: tuple[_Table, _Table],
        keys: Sequence[str],
        cost: int,
        now: float,
    ) -> list[Outcome]:
        """Two counters in two tables (a rule and the tenant's bucket, say): both read,
        both stepped, both written only if neither enforced one denies, so there is
        nothing to undo. The same as the general loop, with its lists unrolled."""
        first, second = tables
        spec, other = specs
        key, other_key = keys
        self._lock.acquire()  # not `with`: half the cost, on every check
        try:
            live, other_live = first.live, second.live
            state = live.get(key)
            if state is None and first.draining:
                state = first.get(key)
            other_state = other_live.get(other_key)
            if other_state is None and second.draining:
                other_state = second.get(other_key)
            outcome = first.step(state, now, spec[3], spec[2], spec[4], cost)  # type: ignore[misc]
            other_outcome = second.step(  # type: ignore[misc]
                other_state, now, other[3], other[2], other[4], cost
            )
            if (outcome[0] or not spec[5]) and (other_outcome[0] or not other[5]):
                if outcome[0]:
                    live[key] = outcome[1]
                if other_outcome[0]:
                    other_live[other_key] = other_outcome[1]
            self._tick += 1
            table = second if self._tick & 1 else first
            if table.draining or len(table.live) >= 2 * table.floor:
                table.tidy(now)
        finally:
            self._lock.release()
        return [outcome, other_outcome]

    @staticmethod
    def _undo(
        specs: Sequence[CounterSpec],
        tables: Sequence[_Table],
        keys: Sequence[str],
        outcomes: list[Outcome],
        previous: list[Any],
        cost: int,
        lease: str | None,
        now: float,
    ) -> None:
        """Restore what the admitted specs overwrote, then answer for the specs not yet
        seen, against untouched state, so the caller can still report every rule."""
        # newest first, so a counter named twice ends at its oldest state
        admitted = [(t, k) for t, k, o in zip(tables, keys, outcomes, strict=False) if o[0]]
        for (table, key), state in zip(reversed(admitted), reversed(previous), strict=True):
            if state is None:
                table.live.pop(key, None)
            else:
                table.live[key] = state
        seen = len(outcomes)
        for spec, table, key in zip(specs[seen:], tables[seen:], keys[seen:], strict=True):
            state = table.get(key)
            if table.step is None:
                outcome = concurrency.acquire(state, now, spec[3], spec[2], cost, lease or "")
            else:
                outcome = table.step(state, now, spec[3], spec[2], spec[4], cost)
            outcomes.append(outcome)

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
        tenant: str = "",
    ) -> list[Outcome]:
        return self.apply_now(specs, keys, cost, lease, now)

    async def release(self, table: str, key: str, lease: str, now: float, tenant: str = "") -> None:
        self.release_now(table, key, lease, now)

    async def close(self) -> None:
        return None

    def size(self) -> int:
        """Keys held, live or awaiting their check (for tests and memory benchmarks)."""
        with self._lock:
            return sum(len(table) for table in self._tables.values())
