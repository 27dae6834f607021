"""Store-agnostic conformance scenarios: what every ``CounterStore`` must answer.

Each scenario is an async function of a fresh, empty store and drives it only through
``apply`` and ``release`` (never a store's internals), so the very same scenarios run
against memory today and Redis / Redis Cluster later (``test_store_conformance.py``
holds the table of backends). Only the public parts of an ``Outcome`` are compared:
``allowed`` and ``remaining`` exactly, ``reset`` and ``retry_after`` to a microsecond
(an epoch second resolves only to ~0.24 µs as a float); the state is the store's own.

Time is always an explicit ``now``: ``T`` is an exact minute (and a multiple of every
window used here except the hour), so aligned windows start at ``T`` and the numbers
below are worked out by hand, not read back from the engine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Sequence

import pytest

from tenantguard.algorithms import NEVER, Outcome
from tenantguard.stores import CounterSpec, CounterStore

__all__ = ["SCENARIOS", "Scenario", "T"]

T = 1_700_000_040.0
"""An exact minute since the epoch (divisible by 1, 10 and 60, not by 3600)."""

TOLERANCE = 1e-6
"""Seconds of slack on ``reset`` and ``retry_after``; a few float ulps at epoch scale."""

Scenario = Callable[[CounterStore], Awaitable[None]]

WINDOWED = ("fixed-window", "sliding-window", "token-bucket", "gcra")
BUCKETS = ("token-bucket", "gcra")


def spec(
    table: str,
    algorithm: str,
    window: float,
    limit: int,
    burst: int | None = None,
    *,
    enforce: bool = True,
) -> CounterSpec:
    """A counter spec; ``burst`` defaults to ``limit`` as the policy loader does."""
    return CounterSpec(table, algorithm, window, limit, limit if burst is None else burst, enforce)


def _at(instant: float) -> str:
    return f"T{instant - T:+.7f}" if math.isfinite(instant) else str(instant)


def expect(
    outcome: Outcome,
    allowed: bool,
    remaining: int,
    reset: float,
    retry_after: float,
    what: str = "",
) -> None:
    """Assert the public part of one outcome, naming instants relative to ``T``."""
    got = (outcome[0], outcome[2], _at(outcome[3]), outcome[4])
    want = (allowed, remaining, _at(reset), retry_after)
    message = f"{what}: got {got}, want {want}"
    assert outcome[0] is allowed, message
    assert type(outcome[2]) is int, message
    assert outcome[2] == remaining, message
    assert outcome[3] == pytest.approx(reset, abs=TOLERANCE), message
    if math.isinf(retry_after):
        assert outcome[4] == retry_after, message
    else:
        assert outcome[4] == pytest.approx(retry_after, abs=TOLERANCE), message


def _consistent(outcome: Outcome, now: float) -> None:
    """What holds of every outcome: admitted ⇔ no wait; a denial names a wait > 0."""
    allowed, _, remaining, reset, retry_after = outcome
    what = f"at {_at(now)}: {(allowed, remaining, _at(reset), retry_after)}"
    assert remaining >= 0, what
    assert reset >= now - TOLERANCE, what
    if allowed:
        assert retry_after == 0.0, what
    else:
        assert retry_after > 0.0, f"denied without a wait {what}"


async def one(
    store: CounterStore,
    counter: CounterSpec,
    key: str,
    now: float,
    cost: int = 1,
    lease: str | None = None,
) -> Outcome:
    """Apply a single spec and return its one outcome."""
    outcomes = await store.apply([counter], [key], cost, lease, now)
    assert len(outcomes) == 1
    _consistent(outcomes[0], now)
    return outcomes[0]


async def admitted(
    store: CounterStore,
    counter: CounterSpec,
    key: str,
    now: float,
    attempts: int,
    cost: int = 1,
    lease_prefix: str = "lease",
) -> int:
    """How many of ``attempts`` identical requests at ``now`` are admitted."""
    count = 0
    for attempt in range(attempts):
        lease = f"{lease_prefix}-{attempt}" if counter.algorithm == "concurrency" else None
        outcome = await one(store, counter, key, now, cost, lease)
        count += outcome[0]
    return count


async def admits(
    store: CounterStore,
    counter: CounterSpec,
    key: str,
    now: float,
    attempts: int,
    *,
    want: int,
    what: str = "",
) -> None:
    """Assert that exactly ``want`` of ``attempts`` requests at ``now`` are admitted."""
    got = await admitted(store, counter, key, now, attempts)
    assert got == want, f"{what} {counter.table} {key!r} at {_at(now)}: {got} admitted, want {want}"


async def apply_all(
    store: CounterStore,
    specs: Sequence[CounterSpec],
    key: str,
    now: float,
    cost: int = 1,
    lease: str | None = None,
) -> list[Outcome]:
    outcomes = await store.apply(specs, [key] * len(specs), cost, lease, now)
    assert len(outcomes) == len(specs)
    for outcome in outcomes:
        _consistent(outcome, now)
    return outcomes


# --- fixed window -----------------------------------------------------------------------


async def fixed_window_resets(store: CounterStore) -> None:
    """Exactly ``limit`` per aligned window; the count starts over at the boundary."""
    counter = spec("fw", "fixed-window", 60.0, 5)
    # the first request lands mid-window: the window is still [T, T+60), not [T+30, T+90)
    for used in range(1, 6):
        outcome = await one(store, counter, "acme", T + 30 + used)
        expect(outcome, True, 5 - used, T + 60, 0.0, f"request {used}")
    expect(await one(store, counter, "acme", T + 59.5), False, 0, T + 60, 0.5, "6th")
    expect(await one(store, counter, "acme", T + 59.999), False, 0, T + 60, 0.001, "7th")
    expect(await one(store, counter, "acme", T + 60), True, 4, T + 120, 0.0, "boundary")
    await admits(store, counter, "acme", T + 119.9, 10, want=4)
    await admits(store, counter, "acme", T + 120, 10, want=5)


async def fixed_window_reset_and_retry_after(store: CounterStore) -> None:
    """``reset`` is the end of the aligned window; ``retry_after`` the time until it."""
    hourly = spec("fw-hour", "fixed-window", 3600.0, 2)
    end = T - T % 3600 + 3600  # T is 840 s into its hour
    assert end == T + 2760
    expect(await one(store, hourly, "acme", T), True, 1, end, 0.0)
    expect(await one(store, hourly, "acme", T + 1), True, 0, end, 0.0)
    expect(await one(store, hourly, "acme", T + 100), False, 0, end, 2660.0)
    expect(await one(store, hourly, "acme", end - 0.25), False, 0, end, 0.25)
    expect(await one(store, hourly, "acme", end), True, 1, end + 3600, 0.0)

    per_second = spec("fw-second", "fixed-window", 1.0, 1)
    expect(await one(store, per_second, "acme", T + 0.25), True, 0, T + 1, 0.0)
    expect(await one(store, per_second, "acme", T + 0.75), False, 0, T + 1, 0.25)
    expect(await one(store, per_second, "acme", T + 1), True, 0, T + 2, 0.0)


# --- sliding window ---------------------------------------------------------------------


async def sliding_window_weighting(store: CounterStore) -> None:
    """The previous window counts by the share of it still inside the sliding window."""
    counter = spec("sw", "sliding-window", 60.0, 10)
    for used in range(1, 11):
        expect(await one(store, counter, "acme", T + 10), True, 10 - used, T + 60, 0.0)
    # full: wait into the next window until 10 × (1 − f) + 1 <= 10, i.e. f = 0.1 (T+66)
    expect(await one(store, counter, "acme", T + 50), False, 0, T + 60, 16.0, "full")
    # at T+75 the previous window weighs 0.75: estimate 7.5, so two more fit
    expect(await one(store, counter, "acme", T + 75), True, 1, T + 120, 0.0, "T+75 #1")
    expect(await one(store, counter, "acme", T + 75), True, 0, T + 120, 0.0, "T+75 #2")
    # 10 × (1 − f) + 2 + 1 <= 10 once f = 0.3, at T+78
    expect(await one(store, counter, "acme", T + 75), False, 0, T + 120, 3.0, "T+75 #3")
    expect(await one(store, counter, "acme", T + 78), True, 0, T + 120, 0.0, "T+78")
    expect(await one(store, counter, "acme", T + 78), False, 0, T + 120, 6.0, "T+78 #2")
    # the next window starts with this one's 3 weighing fully
    await admits(store, counter, "acme", T + 120, 20, want=7)
    # two windows later nothing is left of either
    await admits(store, counter, "acme", T + 300, 20, want=10)

    # a previous window that was half full: at f = 0.5 it counts 2.5
    other = spec("sw", "sliding-window", 60.0, 10)
    await admits(store, other, "globex", T + 59, 5, want=5)
    await admits(store, other, "globex", T + 90, 20, want=7)


# --- token bucket and GCRA --------------------------------------------------------------


def _burst_then_rate(algorithm: str) -> Scenario:
    async def scenario(store: CounterStore) -> None:
        """200 per 10 s: 200 at once, then one every 50 ms, never more than 200 banked."""
        counter = spec(algorithm, algorithm, 10.0, 200)
        expect(await one(store, counter, "acme", T), True, 199, T + 0.05, 0.0, "first")
        await admits(store, counter, "acme", T, 198, want=198)
        expect(await one(store, counter, "acme", T), True, 0, T + 10, 0.0, "200th")
        expect(await one(store, counter, "acme", T), False, 0, T + 10, 0.05, "201st")
        for step in range(1, 201):
            now = T + step * 0.05
            expect(await one(store, counter, "acme", now), True, 0, now + 10, 0.0, f"+{step}")
            expect(await one(store, counter, "acme", now), False, 0, now + 10, 0.05, f"+{step}")
        # a long pause refills to the burst and no further
        await admits(store, counter, "acme", T + 110, 250, want=200)

    scenario.__name__ = f"{algorithm.replace('-', '_')}_burst_then_rate"
    return scenario


def _burst_above_limit(algorithm: str) -> Scenario:
    async def scenario(store: CounterStore) -> None:
        """10 per 10 s with a burst of 30: 30 at once, then refills at one per second."""
        counter = spec(algorithm, algorithm, 10.0, 10, 30)
        await admits(store, counter, "acme", T, 30, want=30)
        expect(await one(store, counter, "acme", T), False, 0, T + 30, 1.0, "31st")
        expect(await one(store, counter, "acme", T + 0.25), False, 0, T + 30, 0.75)
        await admits(store, counter, "acme", T + 5, 10, want=5)
        expect(await one(store, counter, "acme", T + 5), False, 0, T + 35, 1.0, "T+5")
        # cost 20: more than the limit, within the burst; possible once 20 tokens are back
        expect(await one(store, counter, "acme", T + 5, 20), False, 0, T + 35, 20.0, "cost 20")
        expect(await one(store, counter, "acme", T + 25, 20), True, 0, T + 55, 0.0, "T+25")

    scenario.__name__ = f"{algorithm.replace('-', '_')}_burst_above_limit"
    return scenario


async def gcra_matches_token_bucket(store: CounterStore) -> None:
    """GCRA and a token bucket of the same parameters admit the very same requests."""
    rng = random.Random(20_240_601)
    for limit, window, burst in ((200, 10.0, 200), (10, 1.0, 20), (7, 60.0, 3), (5, 1.0, 5)):
        bucket = spec(f"tb-{limit}-{window}-{burst}", "token-bucket", window, limit, burst)
        cell = spec(f"gcra-{limit}-{window}-{burst}", "gcra", window, limit, burst)
        interval = window / limit
        now, allowed, denied = T, 0, 0
        for request in range(400):
            now += interval * rng.choice((0.0, 0.0, 0.0, 0.1, 0.5, 1.0, 1.0, 2.0, 3.5))
            cost = rng.choice((1, 1, 1, 2, 3, burst + 1))
            tb = await one(store, bucket, "acme", now, cost)
            gc = await one(store, cell, "acme", now, cost)
            what = f"{limit}/{window}s burst {burst}, request {request}, cost {cost}"
            expect(gc, tb[0], tb[2], tb[3], tb[4], what)
            allowed += tb[0]
            denied += not tb[0]
        assert allowed > 100, f"{limit}/{window}s: only {allowed} admitted"
        assert denied > 50, f"{limit}/{window}s: only {denied} denied"


# --- cost -------------------------------------------------------------------------------


async def cost_counts_cost(store: CounterStore) -> None:
    """A request of cost 3 uses 3 of the limit, in every algorithm."""
    for algorithm in ("fixed-window", "sliding-window"):
        counter = spec(algorithm, algorithm, 60.0, 10)
        expect(await one(store, counter, "acme", T, 3), True, 7, T + 60, 0.0, algorithm)
        expect(await one(store, counter, "acme", T, 3), True, 4, T + 60, 0.0, algorithm)
        expect(await one(store, counter, "acme", T, 3), True, 1, T + 60, 0.0, algorithm)
        retry = 60.0 if algorithm == "fixed-window" else 60.0 + 60.0 * 2 / 9
        expect(await one(store, counter, "acme", T, 3), False, 1, T + 60, retry, algorithm)
        expect(await one(store, counter, "acme", T, 1), True, 0, T + 60, 0.0, algorithm)

    for algorithm in BUCKETS:  # 10 per 10 s: one token a second
        counter = spec(algorithm, algorithm, 10.0, 10)
        expect(await one(store, counter, "acme", T, 3), True, 7, T + 3, 0.0, algorithm)
        expect(await one(store, counter, "acme", T, 3), True, 4, T + 6, 0.0, algorithm)
        expect(await one(store, counter, "acme", T, 3), True, 1, T + 9, 0.0, algorithm)
        expect(await one(store, counter, "acme", T, 3), False, 1, T + 9, 2.0, algorithm)
        expect(await one(store, counter, "acme", T, 1), True, 0, T + 10, 0.0, algorithm)
        expect(await one(store, counter, "acme", T + 2, 3), False, 2, T + 10, 1.0, algorithm)
        expect(await one(store, counter, "acme", T + 3, 3), True, 0, T + 13, 0.0, algorithm)

    leases = spec("conc", "concurrency", 30.0, 5)
    expect(await one(store, leases, "acme", T, 2, "a"), True, 3, T + 30, 0.0, "a")
    expect(await one(store, leases, "acme", T + 1, 2, "b"), True, 1, T + 30, 0.0, "b")
    expect(await one(store, leases, "acme", T + 2, 2, "c"), False, 1, T + 30, 28.0, "c")
    expect(await one(store, leases, "acme", T + 2, 1, "d"), True, 0, T + 30, 0.0, "d")
    await store.release("conc", "acme", "a", T + 3)
    expect(await one(store, leases, "acme", T + 3, 2, "c"), True, 0, T + 31, 0.0, "c again")
    expect(await one(store, leases, "acme", T + 3, 1, "e"), False, 0, T + 31, 28.0, "e")


async def cost_above_limit_never(store: CounterStore) -> None:
    """A cost no empty counter could admit is denied forever and consumes nothing."""
    for algorithm in ("fixed-window", "sliding-window"):
        counter = spec(algorithm, algorithm, 60.0, 5)
        expect(await one(store, counter, "acme", T, 6), False, 5, T + 60, NEVER, algorithm)
        expect(await one(store, counter, "acme", T, 100), False, 5, T + 60, NEVER, algorithm)
        expect(await one(store, counter, "acme", T, 5), True, 0, T + 60, 0.0, algorithm)
        expect(await one(store, counter, "acme", T, 6), False, 0, T + 60, NEVER, algorithm)

    for algorithm in BUCKETS:  # 5 per 10 s with a burst of 8: cost 8 fits, cost 9 never
        counter = spec(algorithm, algorithm, 10.0, 5, 8)
        expect(await one(store, counter, "acme", T, 9), False, 8, T, NEVER, algorithm)
        expect(await one(store, counter, "acme", T, 8), True, 0, T + 16, 0.0, algorithm)
        expect(await one(store, counter, "acme", T + 1, 9), False, 0, T + 16, NEVER, algorithm)

    leases = spec("conc", "concurrency", 30.0, 3)
    expect(await one(store, leases, "acme", T, 4, "big"), False, 3, T, NEVER, "cost 4")
    expect(await one(store, leases, "acme", T, 3, "all"), True, 0, T + 30, 0.0, "cost 3")
    expect(await one(store, leases, "acme", T + 1, 4, "big"), False, 0, T + 1, NEVER, "full")


# --- several specs in one call ----------------------------------------------------------


async def all_or_nothing(store: CounterStore) -> None:
    """When one enforced spec denies, none of the others consumes anything."""
    wide = spec("wide", "fixed-window", 60.0, 5)
    leases = spec("leases", "concurrency", 30.0, 3)
    bucket = spec("bucket", "token-bucket", 60.0, 4)  # a token every 15 s
    narrow = spec("narrow", "fixed-window", 60.0, 2)
    specs = [wide, leases, bucket, narrow]

    first = await apply_all(store, specs, "acme", T, lease="l1")
    expect(first[0], True, 4, T + 60, 0.0, "wide 1")
    expect(first[1], True, 2, T + 30, 0.0, "leases 1")
    expect(first[2], True, 3, T + 15, 0.0, "bucket 1")
    expect(first[3], True, 1, T + 60, 0.0, "narrow 1")
    second = await apply_all(store, specs, "acme", T, lease="l2")
    expect(second[3], True, 0, T + 60, 0.0, "narrow 2")

    # narrow is full: ten tries are refused, and each sees the others exactly as before
    for attempt in range(3, 13):
        outcomes = await apply_all(store, specs, "acme", T + 1, lease=f"l{attempt}")
        expect(outcomes[0], True, 2, T + 60, 0.0, f"wide {attempt}")
        expect(outcomes[1], True, 0, T + 30, 0.0, f"leases {attempt}")
        expect(outcomes[2], True, 1, T + 45, 0.0, f"bucket {attempt}")
        expect(outcomes[3], False, 0, T + 60, 59.0, f"narrow {attempt}")

    # and each of the others still has exactly what two requests left it
    await admits(store, wide, "acme", T + 2, 10, want=3)
    expect(await one(store, leases, "acme", T + 2, lease="x"), True, 0, T + 30, 0.0, "x")
    expect(await one(store, leases, "acme", T + 2, lease="y"), False, 0, T + 30, 28.0, "y")
    await admits(store, bucket, "acme", T + 2, 10, want=2)


async def all_or_nothing_same_counter_twice(store: CounterStore) -> None:
    """A call naming one counter twice is still all-or-nothing when it is denied."""
    counter = spec("twice", "fixed-window", 60.0, 10)
    closed = spec("closed", "fixed-window", 60.0, 1)
    expect(await one(store, closed, "acme", T), True, 0, T + 60, 0.0, "closed")
    for attempt in range(3):
        outcomes = await apply_all(store, [counter, counter, closed], "acme", T + 1)
        assert [outcome[0] for outcome in outcomes] == [True, True, False], attempt
    await admits(store, counter, "acme", T + 2, 20, want=10)


async def same_counter_twice_counts_twice(store: CounterStore) -> None:
    """A call naming one counter twice, admitted, counts it twice: the second spec sees
    what the first took."""
    counter = spec("twice", "fixed-window", 60.0, 10)
    outcomes = await apply_all(store, [counter, counter], "acme", T)
    assert [outcome[2] for outcome in outcomes] == [9, 8]
    expect(await one(store, counter, "acme", T + 1), True, 7, T + 60, 0.0, "after")


async def shadow_does_not_block(store: CounterStore) -> None:
    """A shadow spec's denial is reported, blocks nothing, and is not itself consumed."""
    enforced = spec("enforced", "fixed-window", 60.0, 5)
    shadow = spec("shadow", "token-bucket", 10.0, 2, enforce=False)  # a token every 5 s
    specs = [enforced, shadow]
    for used in range(1, 6):
        outcomes = await apply_all(store, specs, "acme", T)
        expect(outcomes[0], True, 5 - used, T + 60, 0.0, f"enforced {used}")
        if used <= 2:
            expect(outcomes[1], True, 2 - used, T + 5 * used, 0.0, f"shadow {used}")
        else:
            expect(outcomes[1], False, 0, T + 10, 5.0, f"shadow {used}")
    outcomes = await apply_all(store, specs, "acme", T)
    expect(outcomes[0], False, 0, T + 60, 60.0, "enforced 6")
    expect(outcomes[1], False, 0, T + 10, 5.0, "shadow 6")

    # at T+5 the shadow bucket has one token back: its three denials took nothing;
    # the enforced denial blocks the whole call, so the shadow's admission is not kept
    outcomes = await apply_all(store, specs, "acme", T + 5)
    expect(outcomes[0], False, 0, T + 60, 55.0, "enforced at T+5")
    expect(outcomes[1], True, 0, T + 15, 0.0, "shadow at T+5")
    expect(await one(store, shadow, "acme", T + 5), True, 0, T + 15, 0.0, "shadow alone")
    expect(await one(store, shadow, "acme", T + 5), False, 0, T + 15, 5.0, "shadow empty")


# --- keys -------------------------------------------------------------------------------


async def keys_independent(store: CounterStore) -> None:
    """Each (table, key) counts on its own."""
    for algorithm in WINDOWED:
        counter = spec(f"{algorithm}-1", algorithm, 60.0, 2)
        twin = spec(f"{algorithm}-2", algorithm, 60.0, 2)
        await admits(store, counter, "acme", T, 5, want=2, what=algorithm)
        await admits(store, counter, "globex", T, 5, want=2, what=algorithm)
        await admits(store, twin, "acme", T, 5, want=2, what=algorithm)
        await admits(store, counter, "acme", T, 5, want=0, what=algorithm)

    leases = spec("conc-1", "concurrency", 30.0, 1)
    twin_leases = spec("conc-2", "concurrency", 30.0, 1)
    expect(await one(store, leases, "acme", T, lease="a"), True, 0, T + 30, 0.0)
    expect(await one(store, leases, "globex", T, lease="b"), True, 0, T + 30, 0.0)
    expect(await one(store, twin_leases, "acme", T, lease="c"), True, 0, T + 30, 0.0)
    # releasing lease "a" under another key or table does not free it
    await store.release("conc-1", "globex", "a", T + 1)
    await store.release("conc-2", "acme", "a", T + 1)
    expect(await one(store, leases, "acme", T + 1, lease="d"), False, 0, T + 30, 29.0)
    await store.release("conc-1", "acme", "a", T + 1)
    expect(await one(store, leases, "acme", T + 1, lease="d"), True, 0, T + 31, 0.0)
    expect(await one(store, leases, "globex", T + 1, lease="e"), False, 0, T + 30, 29.0)


async def keys_do_not_collide(store: CounterStore) -> None:
    """Tables and keys that a naive ``table + sep + key`` would merge stay apart."""
    pairs = [
        ("rule", "a:b"),
        ("rule:a", "b"),
        ("rule|fixed-window|60", "x|y"),
        ("rule|fixed-window|60|x", "y"),
        ("rule", "{acme}"),
        ("rule", "acme"),
        ("rule", "{acme}:b"),
        ("rule", "ac me"),
        ("rule", "äcme"),
        ("rule", "acme\n"),
    ]
    for table, key in pairs:
        counter = spec(table, "fixed-window", 60.0, 1)
        expect(await one(store, counter, key, T), True, 0, T + 60, 0.0, f"{table!r} {key!r}")
    for table, key in pairs:
        counter = spec(table, "fixed-window", 60.0, 1)
        expect(await one(store, counter, key, T), False, 0, T + 60, 60.0, f"{table!r} {key!r}")


# --- concurrency ------------------------------------------------------------------------


async def concurrency_acquire_release(store: CounterStore) -> None:
    """``limit`` leases at once; a release frees one slot, once; unknown ones are ignored."""
    leases = spec("conc", "concurrency", 30.0, 3)
    expect(await one(store, leases, "acme", T, lease="a"), True, 2, T + 30, 0.0, "a")
    expect(await one(store, leases, "acme", T + 1, lease="b"), True, 1, T + 30, 0.0, "b")
    expect(await one(store, leases, "acme", T + 2, lease="c"), True, 0, T + 30, 0.0, "c")
    expect(await one(store, leases, "acme", T + 3, lease="d"), False, 0, T + 30, 27.0, "d")

    await store.release("conc", "acme", "b", T + 4)
    expect(await one(store, leases, "acme", T + 4, lease="d"), True, 0, T + 30, 0.0, "d")

    # releasing b again, an unknown lease, or in unknown places changes nothing
    await store.release("conc", "acme", "b", T + 5)
    await store.release("conc", "acme", "never-issued", T + 5)
    await store.release("conc", "nobody", "a", T + 5)
    await store.release("no-such-table", "acme", "a", T + 5)
    expect(await one(store, leases, "acme", T + 5, lease="e"), False, 0, T + 30, 25.0, "e")

    for lease in ("a", "c", "d"):
        await store.release("conc", "acme", lease, T + 6)
    expect(await one(store, leases, "acme", T + 6, lease="f"), True, 2, T + 36, 0.0, "f")
    expect(await one(store, leases, "acme", T + 6, lease="g"), True, 1, T + 36, 0.0, "g")
    expect(await one(store, leases, "acme", T + 6, lease="h"), True, 0, T + 36, 0.0, "h")
    expect(await one(store, leases, "acme", T + 6, lease="i"), False, 0, T + 36, 30.0, "i")


async def concurrency_lease_expires(store: CounterStore) -> None:
    """A lease nobody releases ends at its time-to-live (the spec's window)."""
    leases = spec("conc", "concurrency", 30.0, 2)
    expect(await one(store, leases, "acme", T, lease="a"), True, 1, T + 30, 0.0, "a")
    expect(await one(store, leases, "acme", T + 10, lease="b"), True, 0, T + 30, 0.0, "b")
    expect(await one(store, leases, "acme", T + 29.5, lease="c"), False, 0, T + 30, 0.5)
    # at T+30 lease a has lived its 30 s: exactly when the denial said to retry
    expect(await one(store, leases, "acme", T + 30, lease="c"), True, 0, T + 40, 0.0, "c")
    expect(await one(store, leases, "acme", T + 35, lease="d"), False, 0, T + 40, 5.0, "d")
    await store.release("conc", "acme", "a", T + 35)  # long expired: harmless
    expect(await one(store, leases, "acme", T + 35, lease="d"), False, 0, T + 40, 5.0, "d")
    await admits(store, leases, "acme", T + 100, 5, want=2)


async def concurrency_retry_after_earliest_expiry(store: CounterStore) -> None:
    """A full table's ``retry_after`` is the wait until enough leases have expired."""
    leases = spec("conc", "concurrency", 60.0, 3)
    for offset, lease in ((0, "a"), (5, "b"), (10, "c")):
        outcome = await one(store, leases, "acme", T + offset, lease=lease)
        expect(outcome, True, 2 - offset // 5, T + 60, 0.0, lease)
    expect(await one(store, leases, "acme", T + 20, 1, "d"), False, 0, T + 60, 40.0, "cost 1")
    expect(await one(store, leases, "acme", T + 20, 2, "d"), False, 0, T + 65, 45.0, "cost 2")
    expect(await one(store, leases, "acme", T + 20, 3, "d"), False, 0, T + 70, 50.0, "cost 3")
    expect(await one(store, leases, "acme", T + 60, 2, "d"), False, 1, T + 65, 5.0, "T+60")
    expect(await one(store, leases, "acme", T + 60, 1, "d"), True, 0, T + 65, 0.0, "d")


# --- denials ----------------------------------------------------------------------------


async def denial_reports_state(store: CounterStore) -> None:
    """Denials report what is left and when it is whole, and change neither."""
    fixed = spec("fw", "fixed-window", 60.0, 5)
    await admits(store, fixed, "acme", T, 3, want=3)
    expect(await one(store, fixed, "acme", T + 1, 3), False, 2, T + 60, 59.0, "fixed")
    for second in range(1, 50):
        expect(await one(store, fixed, "acme", T + second, 3), False, 2, T + 60, 60.0 - second)
    expect(await one(store, fixed, "acme", T + 50, 2), True, 0, T + 60, 0.0, "fixed rest")
    await admits(store, fixed, "acme", T + 60, 10, want=5)

    for algorithm in BUCKETS:  # 10 per 10 s
        counter = spec(algorithm, algorithm, 10.0, 10)
        await admits(store, counter, "acme", T, 7, want=7)
        expect(await one(store, counter, "acme", T, 5), False, 3, T + 7, 2.0, algorithm)
        for step in range(1, 10):  # 0.1 s apart: 0.1 token more each time
            now = T + step * 0.1
            expect(await one(store, counter, "acme", now, 5), False, 3, T + 7, 2 - step * 0.1)
        expect(await one(store, counter, "acme", T + 2, 5), True, 0, T + 12, 0.0, algorithm)
        expect(await one(store, counter, "acme", T + 2, 1), False, 0, T + 12, 1.0, algorithm)

    sliding = spec("sw", "sliding-window", 60.0, 10)
    await admits(store, sliding, "acme", T, 6, want=6)
    expect(await one(store, sliding, "acme", T + 1, 5), False, 4, T + 60, 69.0, "sliding")
    expect(await one(store, sliding, "acme", T + 2, 4), True, 0, T + 60, 0.0, "sliding rest")


def _retry_after_is_exact(algorithm: str) -> Scenario:
    async def scenario(store: CounterStore) -> None:
        """Retrying at exactly ``now + retry_after`` passes; a millisecond sooner fails.

        Swept over many limits at an epoch-sized ``now`` that is not window-aligned,
        where a float resolves only ~0.24 µs: float drift must not turn the promised
        instant into another refusal.
        """
        failures: list[str] = []
        for window in (1.0, 10.0, 60.0):
            for limit in (1, 2, 3, 5, 6, 7, 9, 10, 13, 17, 60, 200):
                cost = 1 if limit < 3 else 2
                counter = spec(f"{algorithm}-{window}-{limit}", algorithm, window, limit)
                start = T + 0.37 * window
                tried = 0
                while True:  # fill it, then one more
                    lease = f"lease-{tried}"
                    denial = await one(store, counter, "acme", start, cost, lease)
                    tried += 1
                    if not denial[0]:
                        break
                    assert tried <= limit, f"{limit} per {window}s admitted {tried}"
                retry = denial[4]
                assert 0 < retry < math.inf, f"{limit} per {window}s: retry {retry}"
                sooner = start + retry - min(retry / 2, 1e-3)
                early = await one(store, counter, "acme", sooner, cost, "x")
                if early[0]:
                    failures.append(f"{limit}/{window}s: admitted before retry_after {retry}")
                # store.apply, not one(): a denial here is the failure being collected
                [later] = await store.apply([counter], ["acme"], cost, "x", start + retry)
                if not later[0]:
                    failures.append(
                        f"{limit}/{window}s cost {cost}: denied at now + retry_after "
                        f"(retry_after {retry!r}, then {later[4]!r})"
                    )
        assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)

    scenario.__name__ = f"{algorithm.replace('-', '_')}_retry_after_is_exact"
    return scenario


SCENARIOS: list[tuple[str, Scenario]] = [
    ("fixed-window-resets", fixed_window_resets),
    ("fixed-window-reset-and-retry-after", fixed_window_reset_and_retry_after),
    ("sliding-window-weighting", sliding_window_weighting),
    ("token-bucket-burst-then-rate", _burst_then_rate("token-bucket")),
    ("gcra-burst-then-rate", _burst_then_rate("gcra")),
    ("token-bucket-burst-above-limit", _burst_above_limit("token-bucket")),
    ("gcra-burst-above-limit", _burst_above_limit("gcra")),
    ("gcra-matches-token-bucket", gcra_matches_token_bucket),
    ("cost-counts-cost", cost_counts_cost),
    ("cost-above-limit-never", cost_above_limit_never),
    ("all-or-nothing", all_or_nothing),
    ("all-or-nothing-same-counter-twice", all_or_nothing_same_counter_twice),
    ("same-counter-twice-counts-twice", same_counter_twice_counts_twice),
    ("shadow-does-not-block", shadow_does_not_block),
    ("keys-independent", keys_independent),
    ("keys-do-not-collide", keys_do_not_collide),
    ("concurrency-acquire-release", concurrency_acquire_release),
    ("concurrency-lease-expires", concurrency_lease_expires),
    ("concurrency-retry-after-earliest-expiry", concurrency_retry_after_earliest_expiry),
    ("denial-reports-state", denial_reports_state),
    *(
        (f"{algorithm}-retry-after-is-exact", _retry_after_is_exact(algorithm))
        for algorithm in (*WINDOWED, "concurrency")
    ),
]
"""Every scenario, by the name that test ids use."""
