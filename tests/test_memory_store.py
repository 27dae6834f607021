"""What only the in-process store promises: bounded memory, and exactness under threads.

The shared behaviour (windows, buckets, leases, all-or-nothing) is in ``conformance.py``.
Here ``apply_now`` is driven directly, as ``Guard`` does, with ``now`` always explicit.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from tenantguard.algorithms import Outcome
from tenantguard.stores import CounterSpec, MemoryCounters

T = 1_700_000_040.0  # an exact minute since the epoch

THREADS = 8


def _spec(table: str, algorithm: str, window: float, limit: int) -> CounterSpec:
    return CounterSpec(table, algorithm, window, limit, limit, True)


def _one(
    store: MemoryCounters,
    spec: CounterSpec,
    key: str,
    now: float,
    cost: int = 1,
    lease: str | None = None,
) -> Outcome:
    [outcome] = store.apply_now([spec], [key], cost, lease, now)
    return outcome


def _admitted(store: MemoryCounters, spec: CounterSpec, key: str, now: float, tries: int) -> int:
    leased = spec.algorithm == "concurrency"
    return sum(
        _one(store, spec, key, now, lease=f"probe-{i}" if leased else None)[0] for i in range(tries)
    )


class _Rotations:
    """Counts how often a table starts a drain, read from the table ``bind`` resolves."""

    def __init__(self, store: MemoryCounters, spec: CounterSpec) -> None:
        [self._table] = store.bind([spec])
        self._draining = bool(self._table.draining)
        self.count = 0

    def observe(self) -> None:
        draining = bool(self._table.draining)
        if draining and not self._draining:
            self.count += 1
        self._draining = draining


# --- bounded memory ---------------------------------------------------------------------


def test_expired_keys_are_dropped_and_live_ones_kept() -> None:
    """10,000 buckets, then 10,000 others: the old go, the new stay, size stays bounded."""
    store = MemoryCounters()
    bucket = _spec("bucket", "token-bucket", 1.0, 10)  # a token is back 0.1 s after use
    for i in range(10_000):
        assert _one(store, bucket, f"old-{i}", T)[0]
    assert store.size() == 10_000  # nothing has expired, so nothing may go

    later = T + 60  # every old bucket has long been full again: their state is moot
    peak = 0
    for sweep in range(4):  # the new working set: 10,000 keys, each used once a sweep
        for i in range(10_000):
            outcome = _one(store, bucket, f"new-{i}", later)
            assert outcome[0], (sweep, i)
            assert outcome[2] == 9 - sweep, (sweep, i, outcome)
            peak = max(peak, store.size())
    assert peak <= 25_000, f"peak {peak} keys for a working set of 10,000"
    assert store.size() == 10_000, "expired keys are still held"

    # and the new keys kept their state: four tokens spent, six left
    for i in range(0, 10_000, 97):
        outcome = _one(store, bucket, f"new-{i}", later, cost=10)
        assert (outcome[0], outcome[2]) == (False, 6), (i, outcome)
        assert outcome[4] == pytest.approx(0.4, abs=1e-6), (i, outcome)


def test_stream_of_short_lived_keys_stays_bounded() -> None:
    """A steady stream of new keys whose state soon expires does not grow the table."""
    store = MemoryCounters()
    bucket = _spec("bucket", "token-bucket", 1.0, 10)  # each key's state lasts 0.1 s
    for i in range(10_000):
        assert _one(store, bucket, f"burst-{i}", T)[0]
    peak = 0
    for i in range(100_000):  # 1,000 keys a second: about 100 hold live state at any time
        now = T + 60 + i * 0.001
        assert _one(store, bucket, f"stream-{i}", now)[0]
        peak = max(peak, store.size())
    assert peak <= 25_000, f"{store.size()} keys held now, {peak} at the peak"


SURVIVORS = ["fixed-window", "sliding-window", "token-bucket", "gcra", "concurrency"]


@pytest.mark.parametrize("algorithm", SURVIVORS)
def test_state_that_matters_is_never_evicted(algorithm: str) -> None:
    """A key nobody touches keeps its state through many rotations while it still counts."""
    store = MemoryCounters()
    if algorithm in ("token-bucket", "gcra"):
        spec = _spec("hot", algorithm, 100.0, 10)  # a token every 10 s
    elif algorithm == "concurrency":
        spec = _spec("hot", algorithm, 300.0, 2)  # leases live 300 s
    else:
        spec = _spec("hot", algorithm, 60.0, 10)
    filled_at = T - 30 if algorithm == "sliding-window" else T  # previous window for sliding
    assert _admitted(store, spec, "hot", filled_at, 20) == spec.limit

    rotations = _Rotations(store, spec)
    for i in range(20_000):  # other keys of the same table, never "hot"
        _one(store, spec, f"other-{i}", T + 1 + i * 0.001, lease=f"other-{i}")
        rotations.observe()
    assert rotations.count >= 3, f"only {rotations.count} rotations: the test proves nothing"

    check = T + 30
    if algorithm == "fixed-window":
        outcome = _one(store, spec, "hot", check)
        assert (outcome[0], outcome[2], outcome[3], outcome[4]) == (False, 0, T + 60, 30.0)
    elif algorithm == "sliding-window":
        assert _admitted(store, spec, "hot", check, 20) == 5  # half the old window still counts
    elif algorithm == "concurrency":
        outcome = _one(store, spec, "hot", check, lease="late")
        assert (outcome[0], outcome[2], outcome[3], outcome[4]) == (False, 0, T + 300, 270.0)
    else:
        assert _admitted(store, spec, "hot", check, 20) == 3  # 30 s: three tokens back


# --- threads ----------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads every microsecond so that races have every chance to show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _race(work: Callable[[int], int]) -> list[int]:
    """Run ``work(thread_index)`` on THREADS threads released together; their results."""
    barrier = threading.Barrier(THREADS)
    results = [0] * THREADS
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as error:  # surfaced below, not lost in the thread
            errors.append(error)
            raise

    threads = [threading.Thread(target=run, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("algorithm", SURVIVORS)
def test_threads_admit_exactly_the_limit(algorithm: str) -> None:
    store = MemoryCounters()
    limit, per_thread = 1_000, 500  # 4,000 tries for 1,000 places
    spec = _spec("shared", algorithm, 60.0, limit)
    leased = algorithm == "concurrency"

    def work(index: int) -> int:
        return sum(
            _one(store, spec, "acme", T, lease=f"{index}-{i}" if leased else None)[0]
            for i in range(per_thread)
        )

    assert sum(_race(work)) == limit
    assert _admitted(store, spec, "acme", T, 10) == 0


@pytest.mark.usefixtures("busy_switching")
def test_threads_keep_two_specs_all_or_nothing() -> None:
    store = MemoryCounters()
    wide = _spec("wide", "fixed-window", 60.0, 1_000)
    narrow = _spec("narrow", "token-bucket", 60.0, 600)

    def work(index: int) -> int:
        specs = [wide, narrow] if index % 2 else [narrow, wide]  # both orders race
        return sum(
            all(outcome[0] for outcome in store.apply_now(specs, ["acme", "acme"], 1, None, T))
            for _ in range(250)
        )

    assert sum(_race(work)) == 600
    # wide counted exactly the 600 admitted calls and none of the 1,400 refused ones
    assert _admitted(store, wide, "acme", T, 1_000) == 400
    assert _admitted(store, narrow, "acme", T, 10) == 0


@pytest.mark.usefixtures("busy_switching")
def test_threads_acquiring_and_releasing_leave_no_lease_behind() -> None:
    store = MemoryCounters()
    spec = _spec("leases", "concurrency", 30.0, 3)

    def work(index: int) -> int:
        held = 0
        for i in range(300):
            lease = f"{index}-{i}"
            if _one(store, spec, "acme", T, lease=lease)[0]:
                held += 1
                store.release_now("leases", "acme", lease, T)
        return held

    assert sum(_race(work)) >= 3
    assert _admitted(store, spec, "acme", T, 10) == 3
