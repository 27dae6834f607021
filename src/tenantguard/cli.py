"""The ``tenantguard`` command: ``check`` and ``explain`` a policy, ``serve`` the HTTP API.

This is the one place that reads flags and the environment; everything below it takes
plain arguments. A policy problem is always a list of located messages and an exit
status, never a traceback, because the reader is someone editing a YAML file.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from tenantguard._durations import format_duration
from tenantguard._paths import normalise_path
from tenantguard._routing import Candidate, precedence_reason
from tenantguard._rules import CompiledRule
from tenantguard.errors import PolicyError
from tenantguard.policy import Policy, load_policy, parse_policy

if TYPE_CHECKING:
    from starlette.types import ASGIApp

__all__ = ["app", "main"]

DEFAULT_POLICY = Path("examples/okta-management.yaml")
_BURSTING = ("token-bucket", "gcra")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Enforce the limits a multi-tenant API platform sells with its plans.",
)


def main() -> None:
    app()


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    """Messages stay one line each, so ``file:line:`` prefixes work with grep and editors."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> NoReturn:
    _err().print(Text(message))
    raise typer.Exit(code)


def _load(file: Path) -> Policy:
    """The policy, or every issue on stderr and exit 1."""
    return _load_text(file)[0]


def _load_text(file: Path) -> tuple[Policy, str]:
    """The policy and the text it was compiled from, or every issue on stderr and exit 1."""
    try:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            load_policy(file)  # a PolicyError worded as for every other reader of policies
            raise
        return parse_policy(text, source=str(file)), text
    except PolicyError as error:
        console = _err()
        for issue in error.issues:
            console.print(Text(str(issue)))
        count = len(error.issues)
        console.print(Text(f"{file}: {count} problem{'s' if count != 1 else ''}, not loaded"))
        raise typer.Exit(1) from None
    except Exception as error:
        _fail(f"{file}: could not be loaded ({type(error).__name__}: {error})", 1)


def _show(console: Console, renderable: RenderableType) -> None:
    """Print at natural width when not on a terminal, so piped output is never cut."""
    if not console.is_terminal:
        unbounded = console.options.update_width(1_000_000)
        needed = Measurement.get(console, unbounded, renderable).maximum
        console.width = max(console.width, needed)
    console.print(renderable)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _value(rule: CompiledRule, slot: int) -> str:
    """A rule's value on one plan as a policy would spell it, burst shown when it differs."""
    value = rule.values[slot]
    burst = rule.bursts[slot]
    if isinstance(value, int) and rule.algorithm in _BURSTING and burst not in (None, value):
        return f"{value} (burst {burst})"
    return str(value)


def _window(rule: CompiledRule) -> str:
    if rule.algorithm == "concurrency":
        return f"lease {format_duration(rule.lease_ttl)}"
    return format_duration(rule.window)


def _methods(rule: CompiledRule) -> str:
    return ", ".join(sorted(rule.methods)) if rule.methods else "all"


def _plan_table(title: str, policy: Policy, *headers: str) -> Table:
    """A table of ``headers`` then a right-aligned column per plan."""
    table = Table(title=title, title_justify="left", show_lines=True)
    for header in headers:
        table.add_column(header, overflow="fold")
    for plan in policy.plans:
        table.add_column(plan.name, justify="right", overflow="fold")
    return table


def _rules_table(policy: Policy, group: str) -> Table:
    headers = ("rule", "methods", "paths", "algorithm", "window", "per")
    table = _plan_table(f"group {group}", policy, *headers)
    for rule in policy.rules:
        if rule.group != group:
            continue
        paths = [template.text for template in rule.templates]
        paths += [f"except {template.text}" for template in rule.excepts]
        name = rule.name + (" (shadow)" if rule.shadow else "")
        cells = [name, _methods(rule), "\n".join(paths), rule.algorithm, _window(rule)]
        cells.append(", ".join(rule.per))
        cells += [_value(rule, slot) for slot in range(len(policy.plans))]
        table.add_row(*(Text(cell) for cell in cells))
    return table


def _quotas_table(policy: Policy) -> Table:
    table = _plan_table("quotas", policy, "quota", "kind", "per", "counts toward")
    for quota in policy.quotas.values():
        kind = f"usage per {quota.period}" if quota.period else "entity cap"
        cells = [quota.name, kind, quota.per or "tenant", ", ".join(quota.counts_toward)]
        cells += [str(value) for value in quota.values]
        table.add_row(*(Text(cell) for cell in cells))
    return table


def _entitlements_table(policy: Policy) -> Table:
    table = _plan_table("entitlements", policy, "entitlement")
    for name, values in policy.document.entitlements.items():
        default = values.get("default", "-")
        cells = [name] + [str(values.get(plan.name, default)) for plan in policy.plans]
        table.add_row(*(Text(cell) for cell in cells))
    return table


FileArgument = Annotated[
    Path, typer.Argument(help="Policy file (YAML).", show_default=False, dir_okay=False)
]


@app.command()
def check(file: FileArgument) -> None:
    """Validate a policy and show its rules per group, its quotas and entitlements, per plan."""
    policy = _load(file)
    console = _out()
    for group in policy.routes.groups:
        _show(console, _rules_table(policy, group))
    if policy.quotas:
        _show(console, _quotas_table(policy))
    if policy.document.entitlements:
        _show(console, _entitlements_table(policy))
    groups = len(policy.routes.groups)
    summary = (
        f"{file}: OK, {_plural(len(policy.rules), 'rule')} in {_plural(groups, 'group')}, "
        f"{_plural(len(policy.document.quotas), 'quota')}, {_plural(len(policy.plans), 'plan')}"
    )
    console.print(Text(summary))


def _loss(winner: Candidate | None, loser: Candidate, segments: tuple[str, ...]) -> str:
    if loser.excluded:
        template = next(t for t in loser.rule.excepts if t.matches(segments))
        return f"excluded by except {template.text}"
    if winner is None:
        return "not reached"
    return precedence_reason(winner, loser)


@app.command()
def explain(
    file: FileArgument,
    method: Annotated[str, typer.Argument(help="HTTP method, such as GET.", show_default=False)],
    path: Annotated[str, typer.Argument(help="Request path.", show_default=False)],
    plan: Annotated[
        str | None, typer.Option(help="Show only this plan's value.", show_default=False)
    ] = None,
) -> None:
    """Show which rule of each group a request counts against, and why the others lose."""
    policy = _load(file)
    if plan is not None and plan not in policy.plan_index:
        known = ", ".join(p.name for p in policy.plans)
        _fail(f"unknown plan {plan!r}; expected one of: {known}", 2)
    slots = [policy.plan_index[plan]] if plan is not None else range(len(policy.plans))
    if not method.isascii() or not method.isalpha():
        _fail(f"method {method!r}: expected an HTTP method such as GET (letters only)", 2)
    method = method.upper()
    segments = normalise_path(path)
    normalised = "/" + "/".join(segments)
    console = _out()
    heading = f"{method} {normalised}"
    if normalised != path:
        heading += f" (normalised from {path})"
    console.print(Text(heading, style="bold"))
    candidates = policy.routes.candidates(method, path)
    for group in policy.routes.groups:
        seen: set[str] = set()
        ranked: list[Candidate] = []
        for candidate in candidates:
            if candidate.rule.group == group and candidate.rule.name not in seen:
                seen.add(candidate.rule.name)
                ranked.append(candidate)
        winner = next((c for c in ranked if not c.excluded), None)
        console.print()
        if winner is None:
            console.print(Text(f"group {group}: no rule"))
        else:
            rule = winner.rule
            console.print(Text(f"group {group}: {rule.name}", style="bold"))
            console.print(Text(f"  matched {winner.template.text}"))
            console.print(
                Text(f"  {rule.algorithm}, window {_window(rule)}, per {', '.join(rule.per)}")
            )
            for slot in slots:
                console.print(Text(f"  {policy.plans[slot].name}: {_value(rule, slot)}"))
        for loser in ranked:
            if loser is winner:
                continue
            reason = _loss(winner, loser, segments)
            console.print(Text(f"  not {loser.rule.name} ({loser.template.text}): {reason}"))
        for rule in policy.rules:
            # a rule whose path matches but whose methods do not is no candidate: say so
            if rule.group != group or not rule.methods or method in rule.methods:
                continue
            template = next((t for t in rule.templates if t.matches(segments)), None)
            if template is not None:
                methods = ", ".join(sorted(rule.methods))
                console.print(
                    Text(f"  not {rule.name} ({template.text}): only for {methods}, not {method}")
                )


@dataclass(frozen=True, slots=True)
class _Service:
    """What a worker of ``serve --workers`` needs to build its app: all of it read and
    checked here, once, and pickled to the worker (tokens included: no environment)."""

    policy: Path
    policy_text: str
    counters: str
    ledger: str
    service_token: str
    admin_token: str


def _worker_app(service: _Service, metrics: Path) -> ASGIApp:
    """One worker's app: its own guard, stores and reloader (runs in the worker)."""
    from tenantguard._metrics import WorkerMetrics  # noqa: PLC0415 - as in serve
    from tenantguard.guard import Guard  # noqa: PLC0415
    from tenantguard.policy import parse_policy  # noqa: PLC0415
    from tenantguard.reload import PolicyReloader  # noqa: PLC0415
    from tenantguard.server import create_app  # noqa: PLC0415

    policy = parse_policy(service.policy_text, source=str(service.policy))
    guard = Guard(policy, counters=service.counters, ledger=service.ledger)
    server = create_app(
        guard,
        service_token=service.service_token,
        admin_token=service.admin_token,
        metrics=WorkerMetrics(metrics),
    )
    return PolicyReloader(guard, service.policy).around(server)


@app.command()
def serve(
    policy: Annotated[
        Path | None,
        typer.Option(
            envvar="TENANTGUARD_POLICY",
            help=f"Policy file [default: {DEFAULT_POLICY}]",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(envvar="TENANTGUARD_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="TENANTGUARD_PORT", min=1, max=65535)] = 8080,
    counters: Annotated[
        str, typer.Option(envvar="TENANTGUARD_COUNTERS", help="Counter store URL.")
    ] = "memory",
    ledger: Annotated[
        str, typer.Option(envvar="TENANTGUARD_LEDGER", help="Ledger URL.")
    ] = "sqlite:///tenantguard.db",
    workers: Annotated[
        int,
        typer.Option(
            envvar="TENANTGUARD_WORKERS",
            min=1,
            help="Processes serving the port (SO_REUSEPORT); more than one needs shared "
            "counters (Redis) and a shared ledger (a SQLite file, PostgreSQL).",
        ),
    ] = 1,
) -> None:
    """Run the HTTP decision service."""
    import uvicorn  # noqa: PLC0415 - only serve needs it; check and explain start faster

    from tenantguard.errors import StoreError  # noqa: PLC0415
    from tenantguard.guard import Guard  # noqa: PLC0415
    from tenantguard.ledger import open_ledger  # noqa: PLC0415
    from tenantguard.reload import PolicyReloader  # noqa: PLC0415
    from tenantguard.server import create_app  # noqa: PLC0415
    from tenantguard.stores import MemoryCounters, open_counters  # noqa: PLC0415

    if policy is None:
        policy = DEFAULT_POLICY
        if not policy.is_file():
            _fail(
                f"no policy given and {policy} does not exist in {Path.cwd()}; "
                "pass --policy FILE or set TENANTGUARD_POLICY",
                2,
            )
    loaded, text = _load_text(policy)
    try:
        store = open_counters(counters)
    except ValueError as error:
        _fail(f"--counters {_redact(counters)}: {error}", 2)
    if workers > 1 and isinstance(store, MemoryCounters):
        _fail(
            f"--workers {workers}: with counters in memory each process would count alone, "
            f"admitting up to {workers}x every limit; use --counters redis://HOST:PORT/DB, "
            "or one worker",
            2,
        )
    try:
        book = open_ledger(ledger)
    except ValueError as error:
        _fail(f"--ledger {_redact(ledger)}: {error}", 2)
    except StoreError as error:
        _fail(f"--ledger {_redact(ledger)}: cannot open the ledger: {error}", 1)
    if workers > 1 and _process_local(book):
        asyncio.run(_close(store, book))
        _fail(
            f"--workers {workers}: the ledger {_redact(ledger)} lives in one process, so each "
            "worker would have its own tenants and quotas; use a SQLite file "
            "(sqlite:///PATH) or PostgreSQL, or one worker",
            2,
        )
    console = _out()
    service_token, admin_token = _tokens(console)
    console.print(Text(f"policy {policy}; counters {_redact(counters)}; ledger {_redact(ledger)}"))
    if workers > 1:
        # the parent only checked the configuration (and migrated the ledger, once):
        # each worker opens its own stores
        asyncio.run(_close(store, book))
        service = _Service(policy, text, counters, ledger, service_token, admin_token)
        _serve_workers(service, host, port, workers, console)
        return
    guard = Guard(loaded, counters=store, ledger=book)
    console.print(Text(f"listening on http://{host}:{port}"))
    server = create_app(guard, service_token=service_token, admin_token=admin_token)
    # the policy file is polled for changes while the server runs (from lifespan startup)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (in-flight requests finish, the
    # lifespan closes the guard), then re-raises the signal to the handler it found: make
    # that handler a clean exit, so a stopped service reports success, not -15
    before = {stop: signal.signal(stop, _exit_cleanly) for stop in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(PolicyReloader(guard, policy).around(server), host=host, port=port)
    finally:
        for stop, handler in before.items():
            signal.signal(stop, handler)


def _tokens(console: Console) -> tuple[str, str]:
    """The service and admin tokens from the environment; generated (once, and printed
    once) where none is set."""
    admin_token = os.environ.get("TENANTGUARD_ADMIN_TOKEN") or ""
    service_token = os.environ.get("TENANTGUARD_SERVICE_TOKEN") or admin_token
    if not admin_token and not service_token:
        admin_token = service_token = secrets.token_urlsafe(24)
        console.print(Text(f"generated token (admin and service): {admin_token}"))
    elif not admin_token:
        admin_token = secrets.token_urlsafe(24)
        console.print(Text(f"TENANTGUARD_ADMIN_TOKEN not set; generated: {admin_token}"))
    return service_token, admin_token


def _serve_workers(service: _Service, host: str, port: int, workers: int, console: Console) -> None:
    from tenantguard._api_workers import reserve_port, run_workers  # noqa: PLC0415

    try:
        reserved = reserve_port(host, port)
    except RuntimeError as error:
        _fail(f"--workers {workers}: {error}", 2)
    except OSError as error:
        _fail(f"cannot listen on {host}:{port}: {error.strerror or error}", 1)
    console.print(Text(f"listening on http://{host}:{port} ({workers} workers)"))
    status = run_workers(
        partial(_worker_app, service),
        host=host,
        port=port,
        workers=workers,
        reserved=reserved,
        say=lambda message: _err().print(Text(message)),
    )
    if status:
        raise typer.Exit(status)


def _process_local(ledger: object) -> bool:
    """Whether ``ledger`` lives in this process only (memory, or SQLite in memory)."""
    from tenantguard.ledger import MemoryLedger, SqlLedger  # noqa: PLC0415

    if isinstance(ledger, MemoryLedger):
        return True
    if isinstance(ledger, SqlLedger):
        url = ledger.engine.url
        return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
    return False


async def _close(*closables: Any) -> None:
    for closable in closables:
        await closable.close()


def _redact(url: str) -> str:
    """``url`` without its password: it is printed, and may end up in logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
