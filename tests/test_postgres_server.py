"""The PostgreSQL fixture starts a real server that behaves like a production one."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

import servers
from servers import PostgresServer, ServersMissingError, require_postgres


def test_postgres_answers_select_1(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        settings = conn.execute(
            "SELECT current_database(), current_user, current_setting('fsync')"
        ).fetchone()
    assert settings == ("tenantguard", "postgres", "on")


def test_postgres_url_takes_tables_a_test_leaves_behind(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE leftover (id int)")
        conn.execute("INSERT INTO leftover VALUES (1)")
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM leftover").fetchone() == (1,)


def test_postgres_url_is_emptied_between_tests(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert tables == (0,)


def test_server_stops_and_cleans_up() -> None:
    with PostgresServer() as server:
        directory = server.directory
        with server.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url, connect_timeout=2).close()
    assert not directory.exists()


def test_missing_postgres_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(servers, "POSTGRES_BIN_GLOB", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServersMissingError, match="scripts/install-servers"):
        require_postgres()
