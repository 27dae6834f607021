"""The ``tenantguard`` command line: ``check``, ``explain`` and the wiring of ``serve``."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner, Result

from tenantguard.cli import app

POLICY = """\
version: 1
plans:
  - {name: developer-free, enforcement: hard}
  - {name: developer-paid, enforcement: soft}
  - {name: enterprise, enforcement: contract}
default_plan: developer-free
rate_limits:
  - name: apps-collection
    match:
      paths: [/api/v1/apps, "/api/v1/apps/**"]
    window: 1m
    limits: {developer-free: 20, developer-paid: 25, default: 100}
  - name: apps-item
    match: {paths: ["/api/v1/apps/{id}"]}
    window: 1m
    limits: {developer-free: 100, developer-paid: 300, default: 600}
  - name: groups-collection
    match:
      paths: [/api/v1/groups, "/api/v1/groups/**"]
      except: ["/api/v1/groups/{id}"]
    window: 1m
    limits: {default: 300}
  - name: users-get
    match: {methods: [GET], paths: ["/api/v1/users/{id}"]}
    window: 1m
    limits: {default: 1000}
  - name: users-item
    match: {paths: ["/api/v1/users/{id}"]}
    window: 1m
    limits: {default: 600}
  - name: orgs
    match: {paths: [/api/v1/orgs]}
    window: 1m
    limits: {developer-free: unavailable, developer-paid: unavailable, default: 50}
  - name: api-default
    match: {paths: ["/api/v1/**"]}
    window: 1m
    limits: {default: unlimited}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 200}
    burst: {enterprise: 400}
quotas:
  - name: applications
    limits: {default: 100}
"""


@pytest.fixture
def runner() -> CliRunner:
    # a forced colour or width would make rich wrap the tables these tests read
    return CliRunner(env={"COLUMNS": None, "FORCE_COLOR": None, "TTY_COMPATIBLE": None})


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    return path


def invoke(runner: CliRunner, *args: str | Path) -> Result:
    return runner.invoke(app, [str(arg) for arg in args])


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def row(output: str, rule: str) -> list[str]:
    """The cells of the table row that starts with ``rule``."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0] == rule:
            return cells
    raise AssertionError(f"no row for {rule!r} in:\n{output}")


# check ----------------------------------------------------------------------------


def test_check_prints_every_rule_with_its_value_per_plan(
    runner: CliRunner, policy_file: Path
) -> None:
    result = invoke(runner, "check", policy_file)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "developer-free" in out
    assert "enterprise" in out
    assert row(out, "apps-collection") == [
        "apps-collection", "all", "/api/v1/apps", "fixed-window", "1m", "tenant", "20", "25", "100",
    ]  # fmt: skip
    assert row(out, "users-get")[1] == "GET"
    assert row(out, "orgs")[-3:] == ["unavailable", "unavailable", "50"]
    assert row(out, "api-default")[-3:] == ["unlimited"] * 3
    assert row(out, "tenant-bucket")[3:] == [
        "token-bucket", "10s", "tenant", "200", "200", "200 (burst 400)",
    ]  # fmt: skip
    assert "except /api/v1/groups/{id}" in out
    assert "group endpoint" in out
    assert "group tenant" in out
    assert "8 rules in 2 groups, 1 quota, 3 plans" in out


def test_check_keeps_each_group_in_its_own_table(runner: CliRunner, policy_file: Path) -> None:
    out = invoke(runner, "check", policy_file).stdout
    tenant_table = out[out.index("group tenant") :]
    assert "tenant-bucket" in tenant_table
    assert "apps-item" not in tenant_table


def test_check_shows_quotas_and_entitlements_per_plan(runner: CliRunner) -> None:
    result = invoke(runner, "check", EXAMPLES / "logto.yaml")
    assert result.exit_code == 0, result.output
    out = result.stdout
    quotas = out[out.index("quotas") :]
    assert row(quotas, "access-tokens") == [
        "access-tokens", "usage per month", "tenant", "", "50000", "10000000", "10000000",
    ]  # fmt: skip
    assert row(quotas, "saml-applications")[1:5] == [
        "entity cap", "tenant", "applications", "unavailable",
    ]  # fmt: skip
    entitlements = out[out.index("entitlements") :]
    assert row(entitlements, "audit-log-retention") == ["audit-log-retention", "14d", "14d", "14d"]


BAD_WINDOW = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
rate_limits:
  - name: apps
    match: {paths: [/api/v1/apps]}
    window: 1 minute
    limits: {free: 20}
"""

UNKNOWN_PLAN = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
rate_limits:
  - name: apps
    match: {paths: [/api/v1/apps]}
    window: 1m
    limits:
      free: 20
      pro: 50
"""

TIE = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
rate_limits:
  - name: apps-a
    match: {paths: ["/api/v1/apps/{id}"]}
    window: 1m
    limits: {free: 20}
  - name: apps-b
    match: {paths: ["/api/v1/apps/{appId}"]}
    window: 1m
    limits: {free: 30}
"""


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        pytest.param(BAD_WINDOW, 8, "rate_limits[0] (apps).window", "not a duration", id="window"),
        pytest.param(
            UNKNOWN_PLAN, 11, "rate_limits[0] (apps).limits.pro", "names no plan", id="plan"
        ),
        pytest.param(TIE, 11, "rate_limits[1] (apps-b).match.paths[0]", "'apps-a'", id="tie"),
    ],
)  # fmt: skip
def test_check_reports_every_issue_with_file_line_and_field(
    runner: CliRunner, tmp_path: Path, text: str, line: int, field: str, words: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = invoke(runner, "check", path)
    assert result.exit_code == 1
    assert f"{path}:{line}: {field}: " in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.output
    assert "│" not in result.stdout


def test_check_reports_several_issues_at_once(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(UNKNOWN_PLAN.replace("default_plan: free", "default_plan: gold"), "utf-8")
    result = invoke(runner, "check", path)
    assert result.exit_code == 1
    located = re.findall(rf"^{re.escape(str(path))}:\d+: ", result.stderr, flags=re.M)
    assert len(located) == 2
    assert "default_plan: names no plan" in result.stderr
    assert "2 problems" in result.stderr


def test_check_on_a_missing_file_names_it(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = invoke(runner, "check", path)
    assert result.exit_code == 1
    assert str(path) in result.stderr
    assert "cannot read" in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("version: 1\nplans: [\n", id="yaml-syntax"),
        pytest.param("a: &a [*a]\n", id="recursive-alias"),
        pytest.param("- just\n- a list\n", id="not-a-mapping"),
    ],
)
def test_check_never_prints_a_traceback(runner: CliRunner, tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")
    result = invoke(runner, "check", path)
    assert result.exit_code == 1
    assert str(path) in result.stderr
    assert "Traceback" not in result.output


# explain --------------------------------------------------------------------------


def test_explain_names_the_winner_and_why_each_other_candidate_lost(
    runner: CliRunner, policy_file: Path
) -> None:
    result = invoke(runner, "explain", policy_file, "GET", "/api/v1/apps/0oa1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "group endpoint: apps-item" in out
    assert "matched /api/v1/apps/{id}" in out
    assert "not apps-collection (/api/v1/apps/**): segment 4: a parameter beats '**'" in out
    assert "not api-default (/api/v1/**): segment 3: a literal beats '**'" in out
    for value in ("developer-free: 100", "developer-paid: 300", "enterprise: 600"):
        assert value in out
    assert "group tenant: tenant-bucket" in out
    assert "enterprise: 200 (burst 400)" in out


def test_explain_method_restricted_rule_wins_only_for_its_methods(
    runner: CliRunner, policy_file: Path
) -> None:
    get = invoke(runner, "explain", policy_file, "get", "/api/v1/users/42").stdout
    assert "group endpoint: users-get" in get
    assert (
        "not users-item (/api/v1/users/{id}): same path specificity; "
        "a method-restricted rule beats an unrestricted one"
    ) in get
    post = invoke(runner, "explain", policy_file, "POST", "/api/v1/users/42").stdout
    assert "group endpoint: users-item" in post
    assert "not users-get (/api/v1/users/{id}): only for GET, not POST" in post


def test_explain_refuses_what_is_not_a_method(runner: CliRunner, policy_file: Path) -> None:
    result = invoke(runner, "explain", policy_file, "FOO BAR", "/api")
    assert result.exit_code == 2
    assert "method 'FOO BAR': expected an HTTP method" in result.stderr


def test_explain_says_which_except_excluded_a_rule(runner: CliRunner, policy_file: Path) -> None:
    result = invoke(runner, "explain", policy_file, "GET", "/api/v1/groups/00g1")
    assert result.exit_code == 0
    out = result.stdout
    assert "group endpoint: api-default" in out
    assert (
        "not groups-collection (/api/v1/groups/**): excluded by except /api/v1/groups/{id}"
    ) in out
    below = invoke(runner, "explain", policy_file, "GET", "/api/v1/groups/00g1/users").stdout
    assert "group endpoint: groups-collection" in below


def test_explain_normalises_the_path(runner: CliRunner, policy_file: Path) -> None:
    out = invoke(runner, "explain", policy_file, "GET", "/api//v1/./apps/0oa1/?q=1").stdout
    assert "GET /api/v1/apps/0oa1 (normalised from /api//v1/./apps/0oa1/?q=1)" in out
    assert "group endpoint: apps-item" in out


def test_explain_with_no_matching_rule(runner: CliRunner, policy_file: Path) -> None:
    out = invoke(runner, "explain", policy_file, "POST", "/oauth2/v1/token").stdout
    assert "group endpoint: no rule" in out
    assert "group tenant: tenant-bucket" in out


def test_explain_with_plan_shows_only_that_plan(runner: CliRunner, policy_file: Path) -> None:
    result = invoke(runner, "explain", policy_file, "GET", "/api/v1/orgs", "--plan", "enterprise")
    assert result.exit_code == 0
    assert "enterprise: 50" in result.stdout
    assert "developer-free:" not in result.stdout
    free = invoke(runner, "explain", policy_file, "GET", "/api/v1/orgs", "--plan", "developer-free")
    assert "developer-free: unavailable" in free.stdout


def test_explain_with_an_unknown_plan_lists_the_plans(runner: CliRunner, policy_file: Path) -> None:
    result = invoke(runner, "explain", policy_file, "GET", "/api/v1/apps", "--plan", "gold")
    assert result.exit_code == 2
    assert "unknown plan 'gold'" in result.stderr
    assert "developer-free, developer-paid, enterprise" in result.stderr
    assert result.stdout == ""


def test_explain_on_an_invalid_policy_fails_like_check(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_WINDOW, encoding="utf-8")
    result = invoke(runner, "explain", path, "GET", "/api/v1/apps")
    assert result.exit_code == 1
    assert f"{path}:8: rate_limits[0] (apps).window" in result.stderr


# serve ----------------------------------------------------------------------------


class FakeRun:
    """Stands in for ``uvicorn.run`` and keeps what it was given."""

    def __init__(self) -> None:
        self.app: Any = None
        self.options: dict[str, Any] = {}

    def __call__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.options = options


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(uvicorn, "run", fake)
    names = ("POLICY", "HOST", "PORT", "COUNTERS", "LEDGER", "ADMIN_TOKEN", "SERVICE_TOKEN")
    for name in (*names, "WORKERS"):
        monkeypatch.delenv(f"TENANTGUARD_{name}", raising=False)
    # no ledger file left in the working directory by tests that don't name one
    monkeypatch.setenv("TENANTGUARD_LEDGER", "memory")
    return fake


async def test_serve_reads_the_environment_and_prints_a_working_token(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun
) -> None:
    ledger = policy_file.parent / "ledger.db"
    env = {
        "TENANTGUARD_POLICY": str(policy_file),
        "TENANTGUARD_PORT": "18099",
        "TENANTGUARD_LEDGER": f"sqlite:///{ledger}",
    }
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 0, result.output
    assert fake_run.options == {"host": "0.0.0.0", "port": 18099}
    assert f"ledger sqlite:///{ledger}" in result.stdout
    assert ledger.exists()  # the durable ledger was opened and migrated
    match = re.search(r"generated token \(admin and service\): (\S+)", result.stdout)
    assert match is not None
    transport = httpx.ASGITransport(app=fake_run.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        body = {"tenant": "acme", "method": "GET", "path": "/api/v1/apps"}
        denied = await client.post("/v1/check", json=body)
        allowed = await client.post(
            "/v1/check", json=body, headers={"Authorization": f"Bearer {match[1]}"}
        )
        ready = await client.get("/readyz")
    assert denied.status_code == 401
    assert allowed.status_code == 200
    assert allowed.json()["rule"] == "apps-collection"
    assert ready.json() == {"status": "ready", "policy": str(policy_file), "reload_error": None}


async def test_serve_uses_tokens_from_the_environment(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun
) -> None:
    env = {"TENANTGUARD_SERVICE_TOKEN": "svc-token", "TENANTGUARD_ADMIN_TOKEN": "adm-token"}
    result = runner.invoke(app, ["serve", "--policy", str(policy_file)], env=env)
    assert result.exit_code == 0, result.output
    assert "generated" not in result.stdout
    assert "svc-token" not in result.stdout
    assert "adm-token" not in result.stdout
    assert fake_run.options == {"host": "127.0.0.1", "port": 8080}
    transport = httpx.ASGITransport(app=fake_run.app)
    body = {"tenant": "acme", "method": "GET", "path": "/api/v1/apps"}
    statuses = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for token in ("svc-token", "adm-token", "other"):
            headers = {"Authorization": f"Bearer {token}"}
            response = await client.post("/v1/check", json=body, headers=headers)
            statuses[token] = response.status_code
    assert statuses == {"svc-token": 200, "adm-token": 200, "other": 401}


def test_serve_without_a_policy_explains_what_to_do(
    runner: CliRunner, tmp_path: Path, fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "examples/okta-management.yaml" in result.stderr
    assert "--policy" in result.stderr
    assert fake_run.app is None


def test_serve_refuses_an_unknown_counter_store(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun
) -> None:
    env = {"TENANTGUARD_COUNTERS": "memcached://localhost"}
    result = runner.invoke(app, ["serve", "--policy", str(policy_file)], env=env)
    assert result.exit_code == 2
    assert "memcached" in result.stderr
    assert fake_run.app is None


def test_serve_names_a_bad_counter_option_and_hides_the_password(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun
) -> None:
    env = {"TENANTGUARD_COUNTERS": "redis://:hunter2@127.0.0.1:1/0?timeout=soon"}
    result = runner.invoke(app, ["serve", "--policy", str(policy_file)], env=env)
    assert result.exit_code == 2
    assert "timeout='soon': expected seconds" in result.stderr
    assert "--ledger" not in result.stderr  # only the option that is wrong
    assert "hunter2" not in result.stderr
    assert fake_run.app is None


def test_serve_says_which_ledger_it_cannot_open_without_a_traceback(
    runner: CliRunner, policy_file: Path, tmp_path: Path, fake_run: FakeRun
) -> None:
    url = f"sqlite:///{tmp_path}/missing/dir/ledger.db"
    result = runner.invoke(app, ["serve", "--policy", str(policy_file), "--ledger", url])
    assert result.exit_code == 1
    assert f"--ledger {url}: cannot open the ledger" in result.stderr
    assert "unable to open database file" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert fake_run.app is None


def test_serve_refuses_an_invalid_policy(
    runner: CliRunner, tmp_path: Path, fake_run: FakeRun
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_WINDOW, encoding="utf-8")
    result = runner.invoke(app, ["serve", "--policy", str(path)])
    assert result.exit_code == 1
    assert f"{path}:8:" in result.stderr
    assert fake_run.app is None


# serve --workers ------------------------------------------------------------------


def test_serve_refuses_several_workers_counting_in_memory(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun
) -> None:
    result = runner.invoke(app, ["serve", "--policy", str(policy_file), "--workers", "2"])
    assert result.exit_code == 2
    assert "--workers 2: with counters in memory each process would count alone" in result.stderr
    assert "--counters redis://" in result.stderr
    assert "generated token" not in result.stdout
    assert fake_run.app is None


@pytest.mark.parametrize("ledger", ["memory", "sqlite://", "sqlite:///:memory:"])
def test_serve_refuses_several_workers_on_a_ledger_in_one_process(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun, ledger: str
) -> None:
    env = {
        "TENANTGUARD_WORKERS": "3",
        "TENANTGUARD_COUNTERS": "redis://127.0.0.1:1/0",  # checked, never reached
        "TENANTGUARD_LEDGER": ledger,
    }
    result = runner.invoke(app, ["serve", "--policy", str(policy_file)], env=env)
    assert result.exit_code == 2
    assert f"--workers 3: the ledger {ledger} lives in one process" in result.stderr
    assert fake_run.app is None


def test_serve_needs_at_least_one_worker(
    runner: CliRunner, policy_file: Path, fake_run: FakeRun
) -> None:
    result = runner.invoke(app, ["serve", "--policy", str(policy_file), "--workers", "0"])
    assert result.exit_code == 2
    assert "--workers" in result.stderr
    assert fake_run.app is None


def test_serve_says_when_its_port_is_taken(
    runner: CliRunner, policy_file: Path, tmp_path: Path, fake_run: FakeRun
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [
            "serve", "--policy", str(policy_file), "--workers", "2", "--port", str(port),
            "--counters", "redis://127.0.0.1:1/0", "--ledger", f"sqlite:///{tmp_path / 'l.db'}",
        ]  # fmt: skip
        result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert fake_run.app is None
