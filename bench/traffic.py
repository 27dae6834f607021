"""The one traffic generator every benchmark draws from, so none of them can flatter a cache.

A cache is judged on the traffic that would miss it (STYLE.md, 12). Production traffic on
an identity platform's management API looks like this, and so does what this makes:

* tens of thousands of tenants (Okta-like org ids, ``00o`` + 17 base62 characters), with
  request counts Zipf-skewed by rank: a few orgs send much of the traffic, most send
  little, and the long tail keeps turning up tenants no cache has seen;
* a fresh resource id in every ``{param}``/``*`` segment (``00u…`` for a user, ``0oa…``
  for an app), so almost every path is new: a cache keyed by raw path never hits;
* a durable ledger holding the tenants that are not on the default plan, and the
  overrides that support staff granted to a few of them.

The requests follow the rate rules of ``examples/okta-management.yaml``: every rule's
path templates are expanded (``**`` into 0–2 segments: a sub-resource word, an id) and
each expansion is kept only if the policy's own route table sends it to the rule that
produced it, so a rule's weight is really that rule's share of the traffic. Each request
carries the expanded template it came from (``/api/v1/apps/{id}/users``) because that is
what an application-level limiter keys on: a slowapi or flask-limiter decorator sits on a
route, so its counter is (tenant, route template), never the raw path.

Everything a figure depends on (seed, tenant count, Zipf exponent, record and override
shares, route and method weights, arrival rate) is a constant or a ``TrafficConfig``
field in this module, and ``Traffic.describe()`` prints it next to every result.
``CACHE_FRIENDLY`` (1,000 uniformly drawn tenants, 50 ids per id kind) reproduces the
shape the benchmarks used before; whatever prints a figure from it labels it so.

``python bench/traffic.py [--quick]`` prints the description and a few requests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import yaml

from tenantguard import OverrideRecord, Policy, load_policy, parse_policy
from tenantguard.ledger import Ledger, SqlLedger

ROOT = Path(__file__).resolve().parent.parent
OKTA_POLICY = ROOT / "examples" / "okta-management.yaml"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LENGTH = 17  # Okta ids: a 3-character kind prefix, then 17 base62 characters
EPOCH = 1_700_000_000.0  # where simulated time starts (the guards' injected clocks)

# -- the knobs ------------------------------------------------------------------------------

SEED = 20_250_601
TENANTS = 100_000
EXPONENT = 1.1  # Zipf: the tenant of rank r (from 1) sends in proportion to r ** -EXPONENT
RECORDED = 0.10  # share of tenants with a ledger record (the rest are on the default plan)
OVERRIDDEN = 0.01  # share of tenants with an override
RATE = 1_000.0  # mean arrivals per second of the Poisson process that times the requests
HEAVY = 100
"""The heaviest tenants by rank all have records on contract plans: an org sending
several percent of a fleet's traffic is an enterprise customer, not a free developer."""
HEAVY_OVERRIDES = 10
"""…and the very heaviest have every limit raised (Okta's DynamicScale add-on), as a
platform does for the customers whose traffic would otherwise trip its plans."""
DYNAMIC_SCALE = 10.0

ROUTE_WEIGHTS: Mapping[str, float] = {
    # per rule of the Okta table: users, apps, groups and OAuth traffic dominate; creating
    # orgs and reading the System Log are rare. A rule not named here weighs 1.
    "user-get": 20,
    "users-collection": 6,
    "user-update": 6,
    "app-by-id": 9,
    "apps-collection": 6,
    "group-by-id": 8,
    "groups-collection": 6,
    "custom-authorization-servers": 12,
    "org-authorization-server": 6,
    "oauth2-clients": 2,
    "sessions": 5,
    "most-other-api": 8,
    "logs": 1.5,
    "events": 0.4,
    "orgs": 0.1,
}
METHOD_WEIGHTS: Mapping[str, float] = {"GET": 62, "POST": 22, "PUT": 8, "DELETE": 6, "PATCH": 2}
"""For a rule that allows every method, and within a rule's own method list."""
PLAN_MIX: Mapping[str, float] = {
    # plans of the tenants that have records (the others get the policy's default plan)
    "developer-free": 10,
    "developer-paid": 35,
    "one-app": 20,
    "enterprise": 25,
    "workforce-identity": 10,
}
HEAVY_PLANS: Mapping[str, float] = {"enterprise": 3, "workforce-identity": 1}
REST_SEGMENTS = (0.3, 0.35, 0.35)
"""After a collection (``/api/v1/apps/**``) a ``**`` is the collection itself, an object
of it, or an object's sub-resource, with these odds."""
NAMED_SEGMENTS = (0.5, 0.5)
"""Elsewhere (``/api/v1/**``, ``/oauth2/v1/**``) a ``**`` is a word (``roles``,
``token``) or a word and an id, with these odds."""
OVERRIDE_FACTORS = (1.5, 2.0, 3.0, 5.0, 10.0)  # raises on soft and contract plans
HARD_MULTIPLIER = 0.5  # a hard plan is never raised: its overrides throttle an abuser
EXPIRING = 0.2  # share of overrides granted for 30 days rather than for good
CACHE_FRIENDLY_IDS = 50

ID_KINDS: Mapping[str, str] = {
    # the literal segment before an id says what kind of object it names
    "apps": "0oa",
    "clients": "0oa",
    "idps": "0oa",
    "users": "00u",
    "groups": "00g",
    "sessions": "102",
    "oauth2": "aus",
    "authorizationServers": "aus",
    "policies": "00p",
    "roles": "cr0",
    "factors": "mfa",
    "zones": "nzo",
    "brands": "bnd",
    "domains": "OcD",
}
ID_KIND_OTHER = "00x"
COLLECTIONS = frozenset({"apps", "groups", "users", "sessions", "clients"})
"""After one of these, a ``**`` continues with an object id, then a sub-resource."""
SUBRESOURCES = ("users", "groups", "lifecycle", "roles", "credentials", "factors", "grants")
OAUTH_ENDPOINTS = ("token", "authorize", "introspect", "revoke", "userinfo", "logout")
API_COLLECTIONS = (
    "meta", "roles", "policies", "idps", "authorizationServers", "zones", "brands",
    "domains", "trustedOrigins", "features",
)  # fmt: skip
T = TypeVar("T")
ID = object()  # a fill segment that is an id; str segments are literals


class Request(NamedTuple):
    """One request. ``template`` is the route it was expanded from (``{name}`` where an id
    went), what an application-level limiter keys on; ``rule`` the rule it was made for;
    ``at`` its arrival in epoch seconds (simulated, from ``EPOCH``)."""

    tenant: str
    method: str
    path: str
    template: str
    rule: str
    client: str | None
    ip: str | None
    at: float


class OverrideSpec(NamedTuple):
    """An override before it meets a policy: ``factor`` times the plan's value, stored as a
    value (contract plans) or a multiplier (the others); ``expires_in`` seconds or never.
    ``rule`` ``*`` stands for every rule with a number on the tenant's plan."""

    tenant: str
    rule: str
    factor: float
    as_value: bool
    expires_in: float | None


@dataclass(frozen=True)
class TrafficConfig:
    tenants: int = TENANTS
    exponent: float = EXPONENT
    seed: int = SEED
    recorded: float = RECORDED
    overridden: float = OVERRIDDEN
    rate: float = RATE
    id_pool: int | None = None
    """``None``: a fresh id in every id segment; N: ids drawn from N per kind."""
    label: str = "realistic"
    route_weights: Mapping[str, float] = field(default_factory=lambda: dict(ROUTE_WEIGHTS))

    @property
    def cache_friendly(self) -> bool:
        """Ids from a small pool: paths repeat, so any path-keyed cache is flattered."""
        return self.id_pool is not None


REALISTIC = TrafficConfig()
CACHE_FRIENDLY = TrafficConfig(
    tenants=1_000, exponent=0.0, id_pool=CACHE_FRIENDLY_IDS, label="CACHE-FRIENDLY"
)


@dataclass(frozen=True, slots=True)
class Route:
    """One expansion of a rule's template: the parts of its path (a literal, or an id
    kind prefix with ``is_id``) and its weight among all routes."""

    rule: str
    method: str
    template: str
    parts: tuple[tuple[str, bool], ...]
    weight: float


# -- the generator --------------------------------------------------------------------------


class Traffic:
    """Tenants, their records and overrides, the route table and requests, all fixed by
    ``config`` (the same config gives the same traffic in every process)."""

    def __init__(self, config: TrafficConfig = REALISTIC, *, policy: Path = OKTA_POLICY) -> None:
        self.config = config
        self.policy_path = policy
        self.policy = load_policy(policy)
        rng = random.Random(f"{config.seed}:tenants")
        self.tenants = tenant_ids(config.tenants, rng)
        self._cumulative = list(
            itertools.accumulate((rank + 1) ** -config.exponent for rank in range(config.tenants))
        )
        self.records = self._records(rng)
        self.plans = dict(self.records)
        self.overrides = self._overrides(rng)
        self.routes = self._routes()
        self._route_cumulative = list(itertools.accumulate(r.weight for r in self.routes))
        self._pool = (
            None if config.id_pool is None else [_base62(rng) for _ in range(config.id_pool)]
        )

    # tenants, records, overrides

    def _records(self, rng: random.Random) -> list[tuple[str, str]]:
        config = self.config
        wanted = round(config.tenants * config.recorded)
        heavy = min(HEAVY, wanted // 10)
        plans = [plan.name for plan in self.policy.plans]
        mix = {name: PLAN_MIX.get(name, 1.0) for name in plans}
        heavy_mix = {name: HEAVY_PLANS[name] for name in plans if name in HEAVY_PLANS} or mix
        chosen = list(range(heavy))
        chosen += rng.sample(range(heavy, config.tenants), wanted - heavy)
        records = []
        for rank in chosen:
            table = heavy_mix if rank < heavy else mix
            plan = rng.choices(list(table), weights=list(table.values()))[0]
            records.append((self.tenants[rank], plan))
        return records

    def _overrides(self, rng: random.Random) -> list[OverrideSpec]:
        """On recorded tenants only (an override is granted to a customer someone knows).
        The ``HEAVY_OVERRIDES`` heaviest get ``DYNAMIC_SCALE`` times every limit (``*``:
        whatever rules the policy they meet has, the tenant bucket of a benchmark
        variant included); the others one override on one rule that has a number on
        their plan."""
        config = self.config
        wanted = min(round(config.tenants * config.overridden), len(self.records))
        heavy = min(HEAVY_OVERRIDES, wanted // 10, HEAVY, len(self.records) // 10)
        out = [
            OverrideSpec(tenant, "*", DYNAMIC_SCALE, False, None)
            for tenant, _ in self.records[:heavy]
        ]
        weights = config.route_weights
        for tenant, plan in rng.sample(self.records[heavy:], wanted - heavy):
            slot = self.policy.plan_index[plan]
            enforcement = self.policy.enforcement(slot)
            rules = [r for r in self.policy.rules if isinstance(r.values[slot], int)]
            if not rules:
                continue
            rule = rng.choices(rules, weights=[weights.get(r.name, 1.0) for r in rules])[0]
            if enforcement == "hard":
                factor, as_value = HARD_MULTIPLIER, False
            else:
                factor = rng.choice(OVERRIDE_FACTORS)
                as_value = enforcement == "contract"
            expires = 30 * 86_400.0 if rng.random() < EXPIRING else None
            out.append(OverrideSpec(tenant, rule.name, factor, as_value, expires))
        return out

    def override_records(self, policy: Policy, now: float = EPOCH) -> list[OverrideRecord]:
        """The overrides as ``policy`` would hold them: a value is the factor times the
        plan's value in ``policy`` (which may be a variant with other numbers)."""
        out = []
        for spec in self.overrides:
            plan = self.plans[spec.tenant]
            if plan not in policy.plan_index:
                continue
            slot = policy.plan_index[plan]
            if spec.rule == "*":
                rules = [r for r in policy.rules if isinstance(r.values[slot], int)]
            else:
                rules = (
                    [policy.rules_by_name[spec.rule]] if spec.rule in policy.rules_by_name else []
                )
            for rule in rules:
                base = rule.values[slot]
                value = multiplier = None
                if spec.as_value and isinstance(base, int):
                    value = max(1, int(base * spec.factor))
                else:
                    multiplier = spec.factor
                expires = None if spec.expires_in is None else now + spec.expires_in
                out.append(
                    OverrideRecord(
                        spec.tenant, rule.name, value, multiplier, "benchmark traffic",
                        expires, "bench", now,
                    )
                )  # fmt: skip
        return out

    # routes

    def _routes(self) -> list[Route]:
        """Every expansion of every weighted rule, kept when the policy's route table
        sends it to that rule; each rule's weight is spread over what was kept."""
        policy = self.policy
        routes: list[Route] = []
        for rule in policy.rules:
            weight = self.config.route_weights.get(rule.name, 1.0)
            if weight <= 0:
                continue
            methods = _method_weights(rule.methods)
            candidates: list[tuple[str, str, tuple[tuple[str, bool], ...], float]] = []
            for template in rule.templates:
                for template_text, parts, share in _expansions(template.text):
                    for method, method_share in methods.items():
                        candidates.append((method, template_text, parts, share * method_share))
            kept = [
                c
                for c in candidates
                if any(m is rule for m in policy.routes.match(c[0], c[1]))  # ids as "{name}"
            ]
            total = sum(c[3] for c in kept)
            routes += [
                Route(rule.name, method, text, parts, weight * share / total)
                for method, text, parts, share in kept
            ]
        if not routes:
            raise ValueError(f"{self.policy_path}: no route of any weighted rule survives")
        return routes

    # requests

    def tenant_sample(self, count: int, rng: random.Random) -> list[str]:
        return rng.choices(self.tenants, cum_weights=self._cumulative, k=count)

    def requests(
        self,
        count: int,
        *,
        stream: int = 0,
        start: float = EPOCH,
        rate: float | None = None,
        clients: bool = False,
    ) -> list[Request]:
        """``count`` requests; another ``stream`` gives other ones (other ids, tenants,
        order), the same stream the same ones. ``clients`` adds a client id (one of up to
        three apps of the tenant) and a documentation-range ip."""
        rng = random.Random(f"{self.config.seed}:requests:{stream}")
        tenants = self.tenant_sample(count, rng)
        routes = rng.choices(self.routes, cum_weights=self._route_cumulative, k=count)
        pace = 1.0 / (rate or self.config.rate)
        at = start
        pool = self._pool
        choices, getrandbits, expovariate = rng.choices, rng.getrandbits, rng.expovariate
        out = []
        for tenant, route in zip(tenants, routes, strict=True):
            segments = []
            for text, is_id in route.parts:
                if not is_id:
                    segments.append(text)
                elif pool is None:
                    segments.append(text + "".join(choices(BASE62, k=ID_LENGTH)))
                else:
                    segments.append(text + pool[getrandbits(32) % len(pool)])
            client = ip = None
            if clients:
                client = f"0oa{tenant[3:14]}{getrandbits(32) % 3:06d}"
                ip = f"{_IP_PREFIXES[getrandbits(2) % 3]}.{getrandbits(8)}"
            at += expovariate(1.0) * pace
            out.append(
                Request(
                    tenant, route.method, "/" + "/".join(segments), route.template, route.rule,
                    client, ip, at,
                )
            )  # fmt: skip
        return out

    def stream(self, chunk: int = 10_000) -> Iterator[list[Request]]:
        """Requests without end, in chunks never all held at once (memory measurements),
        arrivals continuing from chunk to chunk."""
        at = EPOCH
        for index in itertools.count():
            part = self.requests(chunk, stream=1000 + index, start=at)
            at = part[-1].at
            yield part

    # ledgers

    async def seed_ledger(self, ledger: Ledger, policy: Policy, now: float = EPOCH) -> None:
        """Records and overrides through the ``Ledger`` interface (any ledger; one
        transaction per row, so for SQLite at scale use ``seed_sqlite``). Written below
        ``guard.overrides.set``, so the hard-plan rule is this generator's to keep: it
        only ever lowers a hard plan's limits (``HARD_MULTIPLIER``)."""
        for tenant, plan in self.records:
            await ledger.upsert_tenant(tenant, plan, None, now)
        for record in self.override_records(policy, now):
            await ledger.put_override(record)

    async def seed_sqlite(self, url: str, policy: Policy, now: float = EPOCH) -> None:
        """The same rows as ``seed_ledger``, written in one transaction per table."""
        await seed_sqlite(url, self.records, self.override_records(policy, now), now)

    # what it is

    def describe(self, sample: Sequence[Request] = ()) -> str:
        config = self.config
        label = "CACHE-FRIENDLY traffic" if config.cache_friendly else "realistic traffic"
        top = self._cumulative[0] / self._cumulative[-1]
        percent = max(1, config.tenants // 100)
        top_share = self._cumulative[percent - 1] / self._cumulative[-1]
        plans = Counter(plan for _, plan in self.records)
        scaled = sum(spec.rule == "*" for spec in self.overrides)
        ids = (
            "a fresh id in every id segment"
            if self._pool is None
            else f"ids drawn from {len(self._pool)} per kind"
        )
        by_rule: dict[str, float] = {}
        for route in self.routes:
            by_rule[route.rule] = by_rule.get(route.rule, 0.0) + route.weight
        total = sum(by_rule.values())
        lines = [
            f"{label} (bench/traffic.py): seed {config.seed}; {config.tenants:,} tenants"
            f" (00o + 17 base62), Zipf s={config.exponent:g}: the top tenant sends"
            f" {top:.1%}, the top 1% of tenants {top_share:.0%};",
            f"  ledger records on {len(self.records):,} tenants ("
            + ", ".join(f"{name} {count:,}" for name, count in plans.most_common())
            + f"), overrides on {len(self.overrides):,} (the {scaled} heaviest:"
            f" {DYNAMIC_SCALE:g}x every limit; the others one rule each);",
            f"  {len(self.routes)} routes over {len(by_rule)} rules of"
            f" {self.policy_path.name}, {ids}, ** as 0-2 segments; rule shares: "
            + ", ".join(
                f"{name} {weight / total:.0%}"
                for name, weight in sorted(by_rule.items(), key=lambda kv: -kv[1])
            )
            + ";",
            f"  Poisson arrivals at {config.rate:,.0f}/s (simulated clock)",
        ]
        if sample:
            paths = len({(r.method, r.path) for r in sample})
            tenants = len({r.tenant for r in sample})
            with_id = sum("{" in r.template for r in sample)
            lines[-1] += (
                f"; this sample: {len(sample):,} requests, {with_id / len(sample):.0%} with an"
                f" id in the path, {paths / len(sample):.0%} distinct (method, path),"
                f" {tenants:,} distinct tenants"
            )
        return "\n".join(lines)


_IP_PREFIXES = ("192.0.2", "198.51.100", "203.0.113")


def tenant_ids(count: int, rng: random.Random) -> list[str]:
    """Okta-like org ids, in rank order (rank 0 is the heaviest); all distinct."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        tenant = "00o" + _base62(rng)
        if tenant not in seen:
            seen.add(tenant)
            out.append(tenant)
    return out


def many_records(count: int, *, seed: int = SEED) -> Iterator[tuple[str, str]]:
    """``count`` (tenant, plan) records on ``PLAN_MIX``'s plans, made as they are
    consumed: a million-tenant directory without a million-item list beside it."""
    rng = random.Random(f"{seed}:directory:{count}")
    plans, weights = list(PLAN_MIX), list(PLAN_MIX.values())
    for tenant in tenant_ids(count, rng):
        yield tenant, rng.choices(plans, weights=weights)[0]


def _base62(rng: random.Random) -> str:
    return "".join(rng.choices(BASE62, k=ID_LENGTH))


def _method_weights(methods: frozenset[str] | None) -> dict[str, float]:
    allowed = sorted(methods) if methods else list(METHOD_WEIGHTS)
    weights = {m: METHOD_WEIGHTS.get(m, 1.0) for m in allowed}
    total = sum(weights.values())
    return {m: w / total for m, w in weights.items()}


def _expansions(text: str) -> list[tuple[str, tuple[tuple[str, bool], ...], float]]:
    """``(route template, parts, share)`` for each way ``text`` is filled in: a
    ``{name}``/``*`` is an id, a final ``**`` 0, 1 or 2 segments (see ``REST_SEGMENTS``
    and ``NAMED_SEGMENTS``)."""
    segments = [s for s in text.split("/") if s]
    names: set[str] = set()
    fixed: list[tuple[str, str, bool]] = []  # (template segment, literal or id kind, is_id)
    rest = False
    previous = ""
    for index, segment in enumerate(segments):
        if segment == "**" and index == len(segments) - 1:
            rest = True
        elif segment == "*" or segment.startswith("{"):
            name = _unique("id" if segment == "*" else segment[1:-1], names)
            fixed.append((f"{{{name}}}", ID_KINDS.get(previous, ID_KIND_OTHER), True))
        else:
            fixed.append((segment, segment, False))
            previous = segment
    if not rest:
        return [_expansion(fixed, 1.0)]
    fills: list[tuple[list[object], float]]
    if previous in COLLECTIONS:
        fills = [([], REST_SEGMENTS[0]), ([ID], REST_SEGMENTS[1])]
        fills += [([ID, word], REST_SEGMENTS[2] / len(SUBRESOURCES)) for word in SUBRESOURCES]
    else:
        # nobody calls a bare /api/v1 or /oauth2/v1: here ** is one or two segments
        words = OAUTH_ENDPOINTS if segments[0] == "oauth2" else API_COLLECTIONS
        fills = [([word], NAMED_SEGMENTS[0] / len(words)) for word in words]
        fills += [([word, ID], NAMED_SEGMENTS[1] / len(words)) for word in words]
    out: list[tuple[str, tuple[tuple[str, bool], ...], float]] = []
    for fill, share in fills:
        filled = list(fixed)
        taken = set(names)
        kind_from = previous
        for item in fill:
            if item is ID:
                name = _unique("id", taken)
                filled.append((f"{{{name}}}", ID_KINDS.get(kind_from, ID_KIND_OTHER), True))
            else:
                word = str(item)
                filled.append((word, word, False))
                kind_from = word
        out.append(_expansion(filled, share))
    return out


def _expansion(
    segments: list[tuple[str, str, bool]], share: float
) -> tuple[str, tuple[tuple[str, bool], ...], float]:
    template = "/" + "/".join(s[0] for s in segments)
    return template, tuple((s[1], s[2]) for s in segments), share


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name2``, ``name3``…: a route template names each parameter once."""
    candidate = name
    for number in itertools.count(2):
        if candidate not in taken:
            break
        candidate = f"{name}{number}"
    taken.add(candidate)
    return candidate


# -- policies and ledgers -------------------------------------------------------------------

TENANT_BUCKET = {
    # Logto's tenant-wide 200 requests per 10 s: a second rule in every check, in its own
    # group, so a check evaluates the endpoint rule and the tenant bucket
    "name": "tenant-bucket",
    "group": "tenant",
    "match": {"paths": ["/**"]},
    "algorithm": "token-bucket",
    "window": "10s",
    "limits": {"default": 200},
}


def okta_policy_text(*, tenant_bucket: bool = False, ceiling: int | None = None) -> str:
    """The Okta table as YAML; ``tenant_bucket`` adds the tenant-wide bucket, ``ceiling``
    puts every limit (plans and the bucket) at that number, which keeps the rules, the
    routes and the counting while nothing is ever denied (for benchmarks whose peers do
    not enforce the Okta numbers either)."""
    document = yaml.safe_load(OKTA_POLICY.read_text())
    rules = document["rate_limits"]
    if tenant_bucket:
        rules.append(dict(TENANT_BUCKET))
    if ceiling is not None:
        for rule in rules:
            rule["limits"] = {"default": ceiling}
    text: str = yaml.safe_dump(document, sort_keys=False)
    return text


def okta_policy(*, tenant_bucket: bool = False, ceiling: int | None = None) -> Policy:
    return parse_policy(okta_policy_text(tenant_bucket=tenant_bucket, ceiling=ceiling))


async def seed_sqlite(
    url: str,
    records: Iterable[tuple[str, str]],
    overrides: Iterable[OverrideRecord] = (),
    now: float = EPOCH,
) -> int:
    """Write tenant records and overrides into the SQL ledger at ``url`` (created and
    migrated if new) in one transaction, ``SEED_BATCH`` rows per executemany: the
    per-row API commits each row durably, which is minutes for a million tenants.
    Returns the number of tenant records written."""
    from tenantguard.ledger._schema import OVERRIDES, TENANTS

    ledger = SqlLedger(url)

    def write() -> int:
        written = 0
        with ledger.engine.begin() as conn:
            for batch in _batches(records):
                conn.execute(
                    TENANTS.insert(),
                    [
                        {"tenant": t, "plan": p, "metadata": {}, "created_at": now,
                         "updated_at": now}
                        for t, p in batch
                    ],
                )  # fmt: skip
                written += len(batch)
            for chunk in _batches(overrides):
                conn.execute(OVERRIDES.insert(), [_row(record) for record in chunk])
        return written

    try:
        return await asyncio.to_thread(write)
    finally:
        await ledger.close()


SEED_BATCH = 50_000


def _batches(items: Iterable[T]) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, SEED_BATCH)):
        yield batch


def _row(record: OverrideRecord) -> dict[str, object]:
    return {
        "tenant": record.tenant, "name": record.name, "value": record.value,
        "multiplier": record.multiplier, "reason": record.reason,
        "expires_at": record.expires_at, "created_by": record.created_by,
        "created_at": record.created_at,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="Describe the benchmark traffic.")
    parser.add_argument("--quick", action="store_true", help="a 10k-request sample")
    parser.add_argument("--cache-friendly", action="store_true")
    args = parser.parse_args()
    traffic = Traffic(CACHE_FRIENDLY if args.cache_friendly else REALISTIC)
    sample = traffic.requests(10_000 if args.quick else 100_000)
    print(traffic.describe(sample))
    for request in sample[:12]:
        print(f"  {request.tenant} {request.method:<6} {request.path}  [{request.template}]")
    for route in sorted(traffic.routes, key=lambda r: -r.weight)[:10]:
        print(f"  {route.weight:6.3f} {route.rule:<28} {route.method:<6} {route.template}")


if __name__ == "__main__":
    main()
