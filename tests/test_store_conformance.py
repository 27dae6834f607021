"""Every conformance scenario against every counter store backend.

``BACKENDS`` is the one table to extend: a Redis store is one more entry whose factory
takes its server from a fixture (``request.getfixturevalue``) and yields a connected,
empty store. Test ids read ``<backend>-<scenario>``, e.g. ``memory-fixed-window-resets``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from conformance import SCENARIOS, Scenario
from tenantguard.algorithms import Outcome
from tenantguard.stores import CounterSpec, CounterStore, MemoryCounters, open_counters


@asynccontextmanager
async def _memory(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    store = MemoryCounters()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def _redis(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    url: str = request.getfixturevalue("redis_url")
    store = open_counters(url + "?clock=local&timeout=5")
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def _cluster(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    url: str = request.getfixturevalue("redis_cluster_url")
    seed = url.replace("redis://", "redis+cluster://", 1)
    store = open_counters(seed + "?clock=local&timeout=5")
    try:
        yield store
    finally:
        await store.close()


class _AsTenant:
    """Passes each call's key as its tenant, as the guard does for a rule keyed by the
    tenant alone: on Redis those counters are then the fields of the tenant's hash, where
    without a tenant each is a key of its own. Same scenarios, the other layout."""

    def __init__(self, inner: CounterStore) -> None:
        self.inner = inner

    def apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
        tenant: str = "",
    ) -> Awaitable[list[Outcome]]:
        return self.inner.apply(specs, keys, cost, lease, now, keys[0] if keys else "")

    async def release(self, table: str, key: str, lease: str, now: float, tenant: str = "") -> None:
        await self.inner.release(table, key, lease, now, key)

    async def close(self) -> None:
        await self.inner.close()


def _as_tenant(backend: Backend) -> Backend:
    @asynccontextmanager
    async def scoped(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
        async with backend(request) as store:
            yield _AsTenant(store)

    return scoped


Backend = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[CounterStore]]

BACKENDS: dict[str, Backend] = {
    "memory": _memory,
    "redis": _redis,
    "cluster": _cluster,
    "redis-tenant": _as_tenant(_redis),
    "cluster-tenant": _as_tenant(_cluster),
}

KNOWN_ENGINE_BUGS: dict[str, str] = {}
"""Scenario name → why it fails today; run as strict xfail so a fix is noticed."""


def _cases() -> list[pytest.ParameterSet]:
    cases = []
    for backend in BACKENDS:
        for name, scenario in SCENARIOS:
            bug = KNOWN_ENGINE_BUGS.get(name)
            marks = [pytest.mark.xfail(reason=bug, strict=True)] if bug else []
            cases.append(pytest.param(backend, scenario, id=f"{backend}-{name}", marks=marks))
    return cases


@pytest.fixture
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    """A fresh, empty store of the backend named by the test's ``store`` parameter."""
    backend: str = request.param
    async with BACKENDS[backend](request) as counters:
        yield counters


def test_scenario_names_are_unique() -> None:
    names = [name for name, _ in SCENARIOS]
    assert len(names) == len(set(names))
    assert set(KNOWN_ENGINE_BUGS) <= set(names)


@pytest.mark.parametrize(("store", "scenario"), _cases(), indirect=["store"])
async def test_conformance(store: CounterStore, scenario: Scenario) -> None:
    await scenario(store)
