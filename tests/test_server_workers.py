"""``serve --workers 2``: real processes on a free loopback port, counting in real Redis.

Connections are spread over the workers by the kernel, by a hash of each connection's
addresses, so the tests open a new connection for every request; the workers' metrics
files (in the temporary directory the parent makes, under ``TMPDIR``) say which worker
counted what. Waits are for processes to come up and for a worker's figures to be
published (every second), each bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from servers import free_port

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
headers: [okta]
rate_limits:
  - name: everything
    match: {paths: ["/**"]}
    window: 1h
    limits: {default: LIMIT}
"""
STARTUP = 90.0  # two fresh interpreters on a small, shared machine
PUBLISHED = 15.0
DECISIONS = re.compile(
    r'^tenantguard_decisions_total\{outcome="allowed",rule="everything"\} (\S+)$', re.M
)
RELOADS = re.compile(r'^tenantguard_policy_reload_total\{result="ok"\} (\S+)$', re.M)

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    url: str
    tmp: Path
    policy: Path
    log: Path
    token: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_dir(self) -> Path | None:
        found = list(self.tmp.glob("tenantguard-metrics-*"))
        return found[0] if found else None

    def worker_files(self) -> dict[int, dict[str, Any]]:
        """pid -> the figures each live worker published."""
        directory = self.metrics_dir()
        files: dict[int, dict[str, Any]] = {}
        for path in directory.glob("guards_*.json") if directory else ():
            pid = path.name.split("_")[1].split(".")[0]
            if not path.name.endswith(".dead.json"):
                try:
                    files[int(pid)] = json.loads(path.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
        return files

    def counted(self, total: int) -> dict[int, int]:
        """pid -> allowed decisions, once the live workers' files add up to ``total``."""

        def probe() -> dict[int, int] | None:
            counts = allowed(self.worker_files())
            return counts if sum(counts.values()) == total else None

        return eventually(probe, PUBLISHED, f"the workers to publish {total} decisions")

    def check(self, tenant: str = "acme") -> httpx.Response:
        """One check on a connection of its own."""
        body = {"tenant": tenant, "method": "GET", "path": "/api/v1/apps"}
        headers = {"Authorization": f"Bearer {self.token}", "Connection": "close"}
        return httpx.post(f"{self.url}/v1/check", json=body, headers=headers, timeout=10)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers={"Connection": "close"}, timeout=10).text


def allowed(files: dict[int, dict[str, Any]]) -> dict[int, int]:
    return {
        pid: sum(n for rule, outcome, n in data["decisions"] if outcome == "allowed")
        for pid, data in files.items()
    }


def scraped(pattern: re.Pattern[str], text: str) -> float:
    match = pattern.search(text)
    return float(match[1]) if match else 0.0


@pytest.fixture
def service(tmp_path: Path, redis_url: str) -> Iterator[Service]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("LIMIT", "1000"), encoding="utf-8")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "serve.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGUARD_")}
    env["TMPDIR"] = str(tmp)
    argv = [
        str(Path(sys.executable).parent / "tenantguard"), "serve", "--policy", str(policy),
        "--port", str(port), "--counters", redis_url,
        "--ledger", f"sqlite:///{tmp_path / 'ledger.db'}", "--workers", "2",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    running = Service(process, f"http://127.0.0.1:{port}", tmp, policy, log)
    try:
        match = eventually(
            lambda: re.search(r"generated token \(admin and service\): (\S+)", running.output()),
            STARTUP,
            "the token",
        )
        running.token = match[1]
        eventually(
            lambda: len(running.worker_files()) == 2 or None, STARTUP, "two workers to start"
        )
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        for pid in running.worker_files():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


def test_two_workers_serve_one_port_with_one_token_and_sum_their_metrics(
    service: Service,
) -> None:
    output = service.output()
    assert output.count("generated token") == 1
    assert "(2 workers)" in output

    responses = [service.check(f"tenant-{i % 5}") for i in range(40)]
    assert [r.status_code for r in responses] == [200] * 40
    # each worker counted some of them (all 40 on one worker: 1 chance in 2**39)
    counts = service.counted(40)
    assert sorted(counts.values())[0] > 0, counts
    # whichever worker answers the scrape speaks for both
    for _ in range(6):
        text = service.metrics()
        assert scraped(DECISIONS, text) == 40
        assert scraped(RELOADS, text) == 2  # each worker's first load


def test_a_policy_change_applies_on_every_worker(service: Service) -> None:
    service.policy.write_text(POLICY.replace("LIMIT", "777"), encoding="utf-8")
    eventually(
        lambda: scraped(RELOADS, service.metrics()) == 4 or None,
        PUBLISHED,
        "both workers to reload the policy",
    )
    limits = {service.check().json()["limit"] for _ in range(16)}
    assert limits == {777}
    counts = service.counted(16)
    assert min(counts.values()) > 0, counts  # both answered with the new limit


def test_a_killed_worker_is_replaced_and_its_counts_are_kept(service: Service) -> None:
    for i in range(20):
        assert service.check(f"t{i}").status_code == 200
    counts = service.counted(20)
    victim = max(counts, key=lambda pid: counts[pid])
    os.kill(victim, signal.SIGKILL)

    def replaced_by_now() -> dict[int, dict[str, Any]] | None:
        files = service.worker_files()
        return files if len(files) == 2 and victim not in files else None

    replaced = eventually(replaced_by_now, STARTUP, "a replacement worker")
    assert victim not in replaced
    assert "exited" in service.output()
    for _ in range(4):
        assert scraped(DECISIONS, service.metrics()) == 20  # the dead worker's are kept


def test_sigterm_stops_every_worker_and_cleans_up(service: Service) -> None:
    workers = list(service.worker_files())
    directory = service.metrics_dir()
    assert directory is not None
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 0
    assert not directory.exists()
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert service.output().count("Application shutdown complete") == 2
