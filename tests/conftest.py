"""Real servers for the tests: one Redis, one 3-node Redis Cluster, one Sentinel-managed
Redis and one PostgreSQL per session.

All start on free loopback ports the first time a test asks for them and stop at the
end of the session. Missing binaries fail the tests (a skip would hide a missing
feature); ``scripts/install-servers`` installs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import (
    PostgresServer,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    ServersMissingError,
    require_postgres,
    require_redis,
)


def _require_redis() -> None:
    try:
        require_redis()
    except ServersMissingError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    _require_redis()
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    _require_redis()
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis server, emptied for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """Seed-node URL of the session's Redis Cluster, every master emptied for this test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A sentinel monitoring its own dedicated Redis (``.master``) as ``mymaster``."""
    _require_redis()
    with RedisServer() as master, RedisSentinel(master) as sentinel:
        yield sentinel


@pytest.fixture
def redis_sentinel_url(redis_sentinel: RedisSentinel) -> str:
    """``redis+sentinel://127.0.0.1:<port>/mymaster``, its master emptied for this test."""
    with redis_sentinel.master.client() as client:
        client.flushall()
    return redis_sentinel.service_url


def _require_postgres() -> None:
    try:
        require_postgres()
    except ServersMissingError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL (initdb in a temp dir, as the ``postgres`` user) for the session."""
    _require_postgres()
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://postgres@127.0.0.1:<port>/tenantguard``, emptied for this test.

    Connections a previous test left open are ended first, so none holds a lock that
    would stall the drop or sees the old tables.
    """
    with postgres_server.connect() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        conn.execute("SET lock_timeout = '10s'")
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_server.url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A real SQL ledger: a SQLite file of the test's own, or the session's PostgreSQL
    emptied for the test. A module may define its own (with ``memory`` too, say)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
