"""Start and stop real Redis and PostgreSQL servers for the tests, on free loopback ports.

`RedisServer` is one ``redis-server`` process; `RedisCluster` is three cluster-enabled
masters joined with ``redis-cli --cluster create``. Both are context managers and leave
nothing running behind them: each process is stopped on exit, and an ``atexit`` hook
kills any that a crashed session did not stop. No persistence: every start is empty.

`PostgresServer` is one PostgreSQL cluster made by ``initdb`` in a temp dir and run with
``pg_ctl``, as the ``postgres`` user when the tests run as root (PostgreSQL refuses root).

The binaries come from ``scripts/install-servers``; `require_redis` and `require_postgres`
say so when missing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn, Self

import psycopg
import redis

STARTUP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
STOP_TIMEOUT = 5.0
CLUSTER_SLOTS = 16384
# A port the kernel handed out can be taken again before redis-server binds it.
PORT_ATTEMPTS = 3

_running: set[RedisServer] = set()


class ServersMissingError(RuntimeError):
    """``redis-server`` or ``redis-cli`` is not installed."""


class ServerStartError(RuntimeError):
    """A server did not come up; the message ends with the tail of its log."""


def require_redis() -> None:
    """Raise `ServersMissingError` unless redis-server and redis-cli are on PATH."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        raise ServersMissingError(
            f"{' and '.join(missing)} not found on PATH; the Redis tests run against real "
            "servers. Install them with: scripts/install-servers"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=1.0,
        socket_timeout=1.0,
        decode_responses=True,
    )


class RedisServer:
    """One ``redis-server`` on 127.0.0.1, without persistence, in its own temp dir.

    ``port=None`` picks a free port on the first start; `start` after `stop` or `kill`
    reuses the same port, so clients configured with `url` reconnect to the new process.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        directory: Path | None = None,
    ) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.extra_args = tuple(extra_args)
        self._own_dir = directory is None
        self.directory = (
            directory
            if directory is not None
            else Path(tempfile.mkdtemp(prefix="tenantguard-redis-"))
        )
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A new sync client for this server (strings decoded); close it after use."""
        return _client(self.port)

    def start(self) -> Self:
        """Start the process; return once it answers PING and INFO names its pid."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.kill()  # reap a process that exited on its own
        require_redis()
        attempt = 1
        while True:
            try:
                self._wait_ready(self._spawn())
            except ServerStartError:
                in_use = "Address already in use" in _log_tail(self.log_path)
                self.kill()
                if self._fixed_port or not in_use or attempt == PORT_ATTEMPTS:
                    raise
                self.port = free_port()
                attempt += 1
            else:
                return self

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Does nothing if not running."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would; the port stays reserved for `start`."""
        self._terminate(signal.SIGKILL)

    def close(self) -> None:
        """Stop the process and remove the temp dir."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self._log.write(f"--- {' '.join(argv)}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        _running.add(self)
        return self._process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                self._fail(f"exited with status {process.returncode}")
            try:
                with self.client() as client:
                    # Another server may hold the port; ours exits then, and poll() sees it.
                    if client.ping() and client.info("server")["process_id"] == process.pid:
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() >= deadline:
                self._fail(f"did not answer PING within {STARTUP_TIMEOUT:g} s")
            time.sleep(POLL_INTERVAL)

    def _fail(self, what: str) -> None:
        raise ServerStartError(
            f"redis-server on 127.0.0.1:{self.port} {what}; "
            f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def _terminate(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        _running.discard(self)
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        elif process is not None:
            process.wait()  # already exited: reap it
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisCluster:
    """Three cluster-enabled masters on free loopback ports, no replicas.

    `url` names the first node as the seed; a cluster client discovers the others.
    """

    NODES = 3

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="tenantguard-redis-cluster-"))
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Self:
        require_redis()
        for index in range(self.NODES):
            node_dir = self.directory / f"node{index}"
            node_dir.mkdir()
            node = RedisServer(
                directory=node_dir,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "2000",
                    # The bus port defaults to port + 10000, which may be taken or
                    # above 65535; ask the kernel for one instead.
                    "--cluster-port", str(free_port()),
                ),
            )  # fmt: skip
            self.nodes.append(node)
            node.start()
        self._create()
        self._wait_ok()
        return self

    def flushall(self) -> None:
        """Empty every master."""
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        """Stop every node and remove the temp dir."""
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _create(self) -> None:
        argv = [
            "redis-cli", "--cluster", "create",
            *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas", "0", "--cluster-yes",
        ]  # fmt: skip
        log_path = self.directory / "cluster-create.log"
        with log_path.open("wb") as log:
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=30,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                returncode: int | str = "timeout after 30 s"
            else:
                returncode = result.returncode
        if returncode != 0:
            raise ServerStartError(
                f"{' '.join(argv)} failed ({returncode}); last lines of {log_path}:\n"
                f"{_log_tail(log_path)}"
            )

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            states = [self._state(node) for node in self.nodes]
            if all(
                state.get("cluster_state") == "ok"
                and int(state.get("cluster_slots_assigned", 0)) == CLUSTER_SLOTS
                and int(state.get("cluster_known_nodes", 0)) == self.NODES
                for state in states
            ):
                return
            if time.monotonic() >= deadline:
                logs = "\n".join(
                    f"--- {node.log_path}:\n{_log_tail(node.log_path, 10)}" for node in self.nodes
                )
                raise ServerStartError(
                    f"cluster on ports {self.ports} not ok within {STARTUP_TIMEOUT:g} s; "
                    f"CLUSTER INFO per node: {states}\n{logs}"
                )
            time.sleep(POLL_INTERVAL)

    @staticmethod
    def _state(node: RedisServer) -> dict[str, Any]:
        with node.client() as client:
            info = client.cluster("INFO")
        if isinstance(info, str):  # not parsed by redis-py's callback
            pairs = (line.split(":", 1) for line in info.splitlines() if ":" in line)
            return {key: value.strip() for key, value in pairs}
        return dict(info)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


class RedisSentinel(RedisServer):
    """One ``redis-server --sentinel`` on 127.0.0.1 that monitors ``master`` as ``service``.

    Quorum 1, so this sentinel alone decides; `start` returns once it reports the master
    up. The config file lives in the sentinel's own temp dir (sentinel rewrites it).
    `url` talks to the sentinel itself; `service_url` is the counter-store URL.
    """

    def __init__(self, master: RedisServer, *, service: str = "mymaster") -> None:
        super().__init__()
        self.master = master
        self.service = service
        self.config_path = self.directory / "sentinel.conf"

    @property
    def service_url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.config_path.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            "daemonize no\n"
            f'dir "{self.directory}"\n'
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 5000\n"
            f"sentinel failover-timeout {self.service} 60000\n"
        )
        argv = ["redis-server", str(self.config_path), "--sentinel"]
        self._log = self.log_path.open("ab")
        self._log.write(f"--- {' '.join(argv)}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        _running.add(self)
        return self._process

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        super()._wait_ready(process)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with self.client() as client:
                    state = client.sentinel_master(self.service)
                if state["is_master"] and not (state["is_sdown"] or state["is_disconnected"]):
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                state = None
            if time.monotonic() >= deadline:
                self._fail(
                    f"did not report {self.service} up within {STARTUP_TIMEOUT:g} s: {state}"
                )
            time.sleep(POLL_INTERVAL)


# --- PostgreSQL

POSTGRES_DATABASE = "tenantguard"
POSTGRES_USER = "postgres"
# Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<major>/bin/.
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin dir, else the dir of an ``initdb`` on PATH."""
    candidates = [
        path for path in Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")) if (path / "initdb").exists()
    ]
    if candidates:

        def major(path: Path) -> tuple[int, ...]:
            version = path.parent.name
            return tuple(int(part) for part in version.split(".") if part.isdigit())

        return max(candidates, key=major)
    found = shutil.which("initdb")
    return Path(found).parent if found is not None else None


def require_postgres() -> Path:
    """The PostgreSQL bin dir; raise `ServersMissingError` if there is none."""
    bindir = postgres_bindir()
    missing = (
        ["initdb", "pg_ctl"]
        if bindir is None
        else [name for name in ("initdb", "pg_ctl") if not (bindir / name).exists()]
    )
    if bindir is None or missing:
        raise ServersMissingError(
            f"PostgreSQL's {' and '.join(missing)} not found in {POSTGRES_BIN_GLOB} or on "
            "PATH; the ledger tests run against a real server. Install it with: "
            "scripts/install-servers"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            raise ServersMissingError(
                f"running as root, but there is no {POSTGRES_USER!r} user to run PostgreSQL "
                "as (it refuses root). Install the Debian package with: scripts/install-servers"
            ) from None
    return bindir


_running_postgres: set[PostgresServer] = set()


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1 with a ``tenantguard`` database, in a temp dir.

    As root, the dir is chowned to ``postgres`` and ``initdb``/``pg_ctl`` run through
    ``runuser -u postgres``; as anyone else they run as that user. Authentication is
    ``trust`` for the ``postgres`` superuser; the Unix socket lives in the temp dir (not
    ``/var/run/postgresql``), and ``fsync`` is on, as in production. `url` is
    ``postgresql://postgres@127.0.0.1:<port>/tenantguard``.
    """

    def __init__(self, *, port: int | None = None) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="tenantguard-pg-"))
        self.data_dir = self.directory / "data"
        self.socket_dir = self.directory / "sock"
        self.log_path = self.directory / "postgres.log"
        self._bindir: Path | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{POSTGRES_DATABASE}"

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._started

    def connect(self, database: str = POSTGRES_DATABASE) -> psycopg.Connection[Any]:
        """A new autocommit connection as the superuser; close it after use."""
        return psycopg.connect(self.admin_url(database), autocommit=True, connect_timeout=5)

    def start(self) -> Self:
        """initdb (first time), start with ``pg_ctl -w``, create the database."""
        if self._started:
            raise RuntimeError(f"PostgreSQL on port {self.port} is already running")
        self._bindir = require_postgres()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        attempt = 1
        while True:
            try:
                self._pg_ctl_start()
            except ServerStartError:
                in_use = "already in use" in _log_tail(self.log_path)
                if self._fixed_port or not in_use or attempt == PORT_ATTEMPTS:
                    raise
                self.port = free_port()
                attempt += 1
            else:
                break
        self._check_ours()
        self._create_database()
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: clients are disconnected, the data is flushed."""
        self._pg_ctl_stop("fast")

    def close(self) -> None:
        """Stop the server and remove the temp dir."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # internals

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []

    def _bin(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    def _run(self, argv: list[str], what: str, *, timeout: float) -> None:
        command = [*self._as_owner(), *argv]
        with self.log_path.open("ab") as log:
            log.write(f"--- {' '.join(command)}\n".encode())
            log.flush()
            try:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,  # the owner may not enter the caller's cwd
                    env=self._env(),
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                self._fail(f"{what}: timed out after {timeout:g} s")
        if result.returncode != 0:
            self._fail(f"{what}: exit status {result.returncode}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _initdb(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        self.log_path.touch()
        if os.geteuid() == 0:
            owner = pwd.getpwnam(POSTGRES_USER)
            for path in (self.directory, self.socket_dir, self.log_path):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            [
                self._bin("initdb"),
                "-D", str(self.data_dir),
                "-A", "trust",
                "-U", POSTGRES_USER,
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",  # the empty cluster need not survive a power cut
            ],
            "initdb",
            timeout=120,
        )  # fmt: skip

    def _pg_ctl_start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=on -c max_connections=200"
        )
        _running_postgres.add(self)
        self._started = True
        try:
            self._run(
                [
                    self._bin("pg_ctl"),
                    "-D", str(self.data_dir),
                    "-o", options,
                    "-l", str(self.log_path),
                    "-w", "-t", str(int(STARTUP_TIMEOUT * 3)),
                    "start",
                ],
                f"pg_ctl start on port {self.port}",
                timeout=STARTUP_TIMEOUT * 3 + 5,
            )  # fmt: skip
        except ServerStartError:
            self._pg_ctl_stop("immediate")
            raise

    def _check_ours(self) -> None:
        """pg_ctl -w saw our postmaster accept; make sure the TCP port reaches it too."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.admin_url(), connect_timeout=2) as conn:
                    row = conn.execute("SHOW data_directory").fetchone()
                if row is not None and Path(row[0]) == self.data_dir:
                    return
                self._pg_ctl_stop("immediate")
                self._fail(f"port {self.port} answered for another data directory: {row}")
            except psycopg.OperationalError as error:
                if time.monotonic() >= deadline:
                    self._pg_ctl_stop("immediate")
                    self._fail(f"did not accept connections within {STARTUP_TIMEOUT:g} s: {error}")
            time.sleep(POLL_INTERVAL)

    def _create_database(self) -> None:
        with self.connect("postgres") as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (POSTGRES_DATABASE,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')

    def _pg_ctl_stop(self, mode: str) -> None:
        if not self._started:
            return
        self._started = False
        _running_postgres.discard(self)
        if not (self.data_dir / "postmaster.pid").exists():
            return
        command = [
            *self._as_owner(),
            self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
            "-t", str(int(STOP_TIMEOUT * 6)), "stop",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self._env(),
                timeout=STOP_TIMEOUT * 6 + 5,
                check=False,
            )

    def _fail(self, what: str) -> NoReturn:
        raise ServerStartError(
            f"PostgreSQL on 127.0.0.1:{self.port} ({self.data_dir}) {what}; "
            f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
        )


@atexit.register
def _stop_postgres_leftovers() -> None:
    for server in list(_running_postgres):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            server._pg_ctl_stop("immediate")
