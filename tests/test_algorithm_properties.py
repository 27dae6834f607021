"""Property tests: random traffic, costs and clocks against the pure algorithms.

Each algorithm is driven directly (no store), as every store calls these same functions.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tenantguard.algorithms import (
    EARLY,
    NEVER,
    STEPS,
    concurrency,
    fixed_window,
    gcra,
    token_bucket,
)
from tenantguard.algorithms import sliding_window as sliding

START = 1_700_000_000.0
SLACK = 1e-6  # float drift allowance on bounds expressed in tokens

# a request: (seconds since the previous one, cost)
traffic = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=30.0, allow_nan=False)),
        st.integers(min_value=1, max_value=5),
    ),
    min_size=1,
    max_size=120,
)
windows = st.sampled_from([1.0, 7.0, 10.0, 60.0])
limits = st.integers(min_value=1, max_value=25)


def run(
    name: str,
    requests: list[tuple[float, int]],
    limit: int,
    window: float,
    burst: int,
    start: float = START,
) -> list[tuple[float, int]]:
    """Admitted (time, cost) pairs; also checks that a denial never changes state."""
    step = STEPS[name]
    state: Any = None
    now = start
    admitted = []
    for gap, cost in requests:
        now += gap
        allowed, new_state, remaining, _reset, retry = step(state, now, limit, window, burst, cost)
        assert remaining >= 0
        if allowed:
            assert retry == 0.0
            admitted.append((now, cost))
            state = new_state
        else:
            assert new_state is state  # a denial consumes nothing
            assert retry > 0.0
    return admitted


@settings(max_examples=300)
@given(traffic, limits, windows, st.floats(min_value=0, max_value=1e5))
def test_fixed_window_never_exceeds_limit_per_aligned_window(
    requests: list[tuple[float, int]], limit: int, window: float, offset: float
) -> None:
    admitted = run("fixed-window", requests, limit, window, limit, START + offset)
    per_window: dict[float, int] = {}
    for at, cost in admitted:
        start = at - at % window
        per_window[start] = per_window.get(start, 0) + cost
    assert all(total <= limit for total in per_window.values())


@settings(max_examples=300)
@given(traffic, limits, windows, st.integers(min_value=1, max_value=40))
def test_buckets_never_exceed_burst_plus_refill(
    requests: list[tuple[float, int]], limit: int, window: float, burst: int
) -> None:
    rate = limit / window
    for name in ("token-bucket", "gcra"):
        admitted = run(name, requests, limit, window, burst)
        # every interval between two admissions (inclusive), and from the start
        for i in range(len(admitted)):
            total = 0
            for j in range(i, len(admitted)):
                total += admitted[j][1]
                elapsed = admitted[j][0] - admitted[i][0]
                # each admission may come EARLY seconds before its token is whole
                assert total <= burst + rate * (elapsed + EARLY) + SLACK, (name, i, j)


@settings(max_examples=300)
@given(traffic, limits, windows, st.integers(min_value=1, max_value=40))
def test_gcra_admits_what_the_token_bucket_admits(
    requests: list[tuple[float, int]], limit: int, window: float, burst: int
) -> None:
    # the two are one algorithm in two notations; compare on a millisecond grid, where
    # neither notation's rounding can tip a boundary case
    grid = [(round(gap, 3), cost) for gap, cost in requests]
    assert run("token-bucket", grid, limit, window, burst) == run(
        "gcra", grid, limit, window, burst
    )


@settings(max_examples=300)
@given(traffic, limits, windows)
def test_sliding_window_within_documented_bound(
    requests: list[tuple[float, int]], limit: int, window: float
) -> None:
    admitted = run("sliding-window", requests, limit, window, limit)
    per_window: dict[float, int] = {}
    for at, cost in admitted:
        start = at - at % window
        per_window[start] = per_window.get(start, 0) + cost
    assert all(total <= limit for total in per_window.values())
    for end, _ in admitted:
        start = end - end % window
        fraction = (end - start) / window
        previous = per_window.get(start - window, 0)
        in_interval = sum(cost for at, cost in admitted if end - window < at <= end)
        assert in_interval <= limit + previous * fraction + SLACK
        assert in_interval < 2 * limit + SLACK


@settings(max_examples=200)
@given(
    st.sampled_from(["fixed-window", "sliding-window", "token-bucket", "gcra"]),
    traffic,
    limits,
    windows,
)
def test_retry_after_is_when_the_request_passes(
    name: str, requests: list[tuple[float, int]], limit: int, window: float
) -> None:
    step = STEPS[name]
    state: Any = None
    now = START
    for gap, cost in requests:
        now += gap
        allowed, new_state, _, _, retry = step(state, now, limit, window, limit, cost)
        if allowed:
            state = new_state
            continue
        if retry == NEVER:
            assert cost > limit
            continue
        # no sooner than promised (allowing for float rounding), and then it passes
        assert step(state, now + retry + 1e-6, limit, window, limit, cost)[0]
        if retry > 1e-3:
            assert not step(state, now + retry - 1e-3, limit, window, limit, cost)[0]


@given(st.sampled_from(["fixed-window", "sliding-window", "token-bucket", "gcra"]), limits)
def test_cost_above_limit_is_never_admitted(name: str, limit: int) -> None:
    allowed, state, _, _, retry = STEPS[name](None, START, limit, 10.0, limit, limit + 1)
    assert not allowed
    assert state is None
    assert retry == NEVER


concurrency_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(min_value=1, max_value=3)),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("wait"), st.floats(min_value=0.0, max_value=20.0)),
    ),
    max_size=150,
)


@settings(max_examples=300)
@given(concurrency_ops, st.integers(min_value=1, max_value=6), st.sampled_from([5.0, 30.0]))
def test_concurrency_never_exceeds_limit(
    ops: list[tuple[str, Any]], limit: int, ttl: float
) -> None:
    state: concurrency.State | None = None
    now = START
    held: dict[str, tuple[float, int]] = {}  # the model: lease -> (expires, cost)
    serial = 0
    for op, arg in ops:
        if op == "wait":
            now += arg
        elif op == "release" and held:
            lease = sorted(held)[arg % len(held)]
            state = concurrency.release(state, now, lease)
            del held[lease]
        elif op == "acquire":
            serial += 1
            lease = f"l{serial}"
            allowed, new_state, remaining, _, retry = concurrency.acquire(
                state, now, limit, ttl, arg, lease
            )
            live = sum(cost for expires, cost in held.values() if expires > now)
            assert allowed == (live + arg <= limit)
            if allowed:
                state = new_state
                held[lease] = (now + ttl, arg)
                assert remaining == limit - live - arg
            else:
                assert new_state is state
                assert retry > 0
        live = sum(cost for expires, cost in held.values() if expires > now)
        assert live <= limit
    # once every lease has expired, the whole limit is free again
    later = now + ttl + 1
    assert concurrency.acquire(state, later, limit, ttl, limit, "fresh")[0]


def test_fixed_window_resets_on_the_minute() -> None:
    now = 1_700_000_045.5  # 45.5 s past a minute boundary (1_700_000_040 % 60 == 0)
    allowed, state, remaining, reset, _ = fixed_window.step(None, now, 2, 60.0, 2, 1)
    assert allowed
    assert remaining == 1
    assert reset == 1_700_000_100.0
    denied = fixed_window.step(fixed_window.step(state, now, 2, 60.0, 2, 1)[1], now, 2, 60, 2, 1)
    assert not denied[0]
    assert denied[4] == 54.5
    assert fixed_window.step(state, 1_700_000_100.0, 2, 60.0, 2, 2)[0]


def test_token_bucket_200_per_10s_refills_20_per_second() -> None:
    state: Any = None
    for _ in range(200):
        allowed, state, *_ = token_bucket.step(state, START, 200, 10.0, 200, 1)
        assert allowed
    denied = token_bucket.step(state, START, 200, 10.0, 200, 1)
    assert not denied[0]
    assert math.isclose(denied[4], 0.05)
    assert token_bucket.step(state, START + 0.05, 200, 10.0, 200, 1)[0]
    # one second refills 20 tokens, not 21
    later = START + 1.0
    count = 0
    while True:
        allowed, new_state, *_ = token_bucket.step(state, later, 200, 10.0, 200, 1)
        if not allowed:
            break
        state, count = new_state, count + 1
    assert count == 20


def test_gcra_state_is_the_theoretical_arrival_time() -> None:
    allowed, state, remaining, reset, _ = gcra.step(None, START, 10, 10.0, 5, 1)
    assert allowed
    ahead, at = state
    assert at + ahead == START + 1.0  # one emission interval ahead of now
    assert remaining == 4
    assert reset == START + 1.0


def test_sliding_window_weights_the_previous_window() -> None:
    state: Any = None
    base = 1_700_000_040.0
    for _ in range(10):
        _, state, *_ = sliding.step(state, base + 1, 10, 60.0, 10, 1)
    # a quarter into the next window, 75 % of the previous 10 still count
    allowed, _, remaining, _, _ = sliding.step(state, base + 60 + 15, 10, 60.0, 10, 2)
    assert allowed
    assert remaining == 0  # 10 - 7.5 - 2 = 0.5
    assert not sliding.step(state, base + 60 + 15, 10, 60.0, 10, 3)[0]
