"""Reading a policy file: YAML → document → cross-field checks → compiled policy.

Every problem becomes a ``PolicyIssue`` naming file, line, field and what was expected;
all problems of a stage are reported together so one edit-check cycle fixes them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tenantguard._paths import parse_template
from tenantguard._routing import RouteTable, find_conflicts
from tenantguard._rules import CompiledRule
from tenantguard.errors import PolicyError, PolicyIssue
from tenantguard.policy._model import (
    UNLIMITED,
    Events,
    Match,
    Plan,
    PolicyDocument,
    Quota,
    RateLimit,
)
from tenantguard.policy._policy import Policy
from tenantguard.policy._yaml import Located, YamlError, load_located

__all__ = ["load_policy", "parse_policy"]

Loc = tuple[str | int, ...]
DEFAULT_LEASE_TTL = 60.0


def load_policy(path: str | Path) -> Policy:
    """Load and compile the policy file at ``path``; ``PolicyError`` if it is invalid."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(
            [PolicyIssue(source, None, "", f"cannot read: {error.strerror}")]
        ) from error
    except UnicodeDecodeError as error:
        raise PolicyError([PolicyIssue(source, None, "", "not UTF-8 text")]) from error
    return parse_policy(text, source=source)


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Compile a policy from YAML ``text``; ``source`` names it in error messages."""
    try:
        located = load_located(text)
    except YamlError as problem:
        raise PolicyError(
            [PolicyIssue(source, problem.line, problem.field, problem.message)]
        ) from None
    if not isinstance(located.data, dict):
        raise PolicyError([PolicyIssue(source, 1, "", "expected a mapping with version, plans, …")])
    try:
        document = PolicyDocument.model_validate(located.data)
    except ValidationError as error:
        raise PolicyError(_validation_issues(error, located, source)) from None
    issues = _Checker(document, located, source).run()
    if issues:
        raise PolicyError(issues)
    return _compile(document, located, source)


def _field(loc: Loc, data: Any) -> str:
    """``rate_limits[3] (apps-collection).limits.pro``: indices plus the item's name."""
    text = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            item = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                text += f" ({item['name']})"
            node = item
        else:
            text += f".{part}" if text else part
            node = node.get(part) if isinstance(node, dict) else None
    return text


def _validation_issues(error: ValidationError, located: Located, source: str) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    problems = error.errors(include_url=False)
    locs = [tuple(problem["loc"]) for problem in problems]
    for problem in problems:
        loc: Loc = tuple(part for part in problem["loc"] if isinstance(part, int | str))
        if problem["type"] == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other in locs
        ):
            continue  # a list emptied by its own items' errors: those errors say it all
        # union members add type tags ("int", "function-before[...]"); keep the real path
        while (
            loc
            and isinstance(loc[-1], str)
            and loc[:-1] in located.lines
            and loc not in located.lines
            and problem["type"] != "missing"
            and problem["type"] != "extra_forbidden"
        ):
            loc = loc[:-1]
        kind = problem["type"]
        if kind == "extra_forbidden":
            parent = _keys_at(loc[:-1])
            expected = ", ".join(parent) if parent else ""
            message = f"unknown key {loc[-1]!r}" + (
                f"; expected one of: {expected}" if expected else ""
            )
        elif kind == "missing":
            message = "required field is missing"
        else:
            message = problem["msg"].removeprefix("Value error, ")
            if kind not in ("value_error",) and "input" in problem:
                message += f", got {problem['input']!r}"
        issues.append(PolicyIssue(source, located.line_of(loc), _field(loc, located.data), message))
    return issues


_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): PolicyDocument,
    ("plans",): Plan,
    ("rate_limits",): RateLimit,
    ("rate_limits", "match"): Match,
    ("quotas",): Quota,
    ("events",): Events,
}


def _keys_at(loc: Loc) -> list[str]:
    """The keys a mapping at ``loc`` may have (for 'unknown key' messages)."""
    model = _SECTIONS.get(tuple(part for part in loc if isinstance(part, str)))
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


class _Checker:
    """Cross-field rules, each problem located at the field that breaks it."""

    def __init__(self, document: PolicyDocument, located: Located, source: str) -> None:
        self.document = document
        self.located = located
        self.source = source
        self.issues: list[PolicyIssue] = []
        self.plans = [plan.name for plan in document.plans]

    def problem(self, loc: Loc, message: str) -> None:
        line = self.located.line_of(loc)
        self.issues.append(PolicyIssue(self.source, line, _field(loc, self.located.data), message))

    def run(self) -> list[PolicyIssue]:
        doc = self.document
        self.unique([plan.name for plan in doc.plans], "plans", "plan")
        if doc.default_plan not in self.plans:
            self.problem(
                ("default_plan",), f"names no plan; expected one of: {', '.join(self.plans)}"
            )
        self.unique([rule.name for rule in doc.rate_limits], "rate_limits", "rule")
        self.unique([quota.name for quota in doc.quotas], "quotas", "quota")
        for index, rule in enumerate(doc.rate_limits):
            self.rate_limit(index, rule)
        quota_names = {quota.name: quota for quota in doc.quotas}
        for index, quota in enumerate(doc.quotas):
            self.per_plan(("quotas", index, "limits"), quota.limits)
            for position, target in enumerate(quota.counts_toward):
                loc: Loc = ("quotas", index, "counts_toward", position)
                if target not in quota_names:
                    self.problem(
                        loc, f"names no quota {target!r}; expected one of: {', '.join(quota_names)}"
                    )
                elif target == quota.name:
                    self.problem(loc, "a quota cannot count toward itself")
                elif quota_names[target].period != quota.period:
                    self.problem(
                        loc,
                        f"{target!r} is counted per {quota_names[target].period or 'lifetime'}, "
                        f"this quota per {quota.period or 'lifetime'}; both must agree",
                    )
        self.cycles(quota_names)
        for name, values in doc.entitlements.items():
            self.per_plan(("entitlements", name), values)
        return self.issues

    def unique(self, names: list[str], section: str, what: str) -> None:
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in first:
                self.problem(
                    (section, index, "name"),
                    f"duplicate {what} name {name!r} (also {section}[{first[name]}])",
                )
            else:
                first[name] = index

    def per_plan(self, loc: Loc, values: dict[str, Any], *, required: bool = True) -> None:
        for key in values:
            if key != "default" and key not in self.plans:
                self.problem(
                    (*loc, key),
                    f"names no plan; expected one of: {', '.join(self.plans)} or default",
                )
        missing = [plan for plan in self.plans if plan not in values]
        if required and missing and "default" not in values:
            self.problem(
                loc,
                f"no value for plan(s) {', '.join(missing)}; "
                "give each plan a value or add 'default'",
            )

    def rate_limit(self, index: int, rule: RateLimit) -> None:
        loc: Loc = ("rate_limits", index)
        self.per_plan((*loc, "limits"), rule.limits)
        if rule.burst is not None:
            self.per_plan((*loc, "burst"), rule.burst, required=False)
            if rule.algorithm not in ("token-bucket", "gcra"):
                self.problem(
                    (*loc, "burst"), f"burst applies to token-bucket and gcra, not {rule.algorithm}"
                )
        if rule.algorithm == "concurrency":
            if rule.window is not None:
                self.problem(
                    (*loc, "window"),
                    "a concurrency rule has no window; use lease_ttl for how long an "
                    "unreleased lease holds its slot",
                )
        else:
            if rule.window is None:
                self.problem(
                    loc, f"window is required for {rule.algorithm}; expected a duration such as 1m"
                )
            if rule.lease_ttl is not None:
                self.problem((*loc, "lease_ttl"), "lease_ttl applies to concurrency rules only")

    def cycles(self, quotas: dict[str, Any]) -> None:
        for index, quota in enumerate(self.document.quotas):
            seen, todo = set(), list(quota.counts_toward)
            while todo:
                name = todo.pop()
                if name == quota.name:
                    self.problem(
                        ("quotas", index, "counts_toward"),
                        "counts_toward forms a cycle back to this quota",
                    )
                    break
                if name in seen or name not in quotas:
                    continue
                seen.add(name)
                todo.extend(quotas[name].counts_toward)


def _compile(document: PolicyDocument, located: Located, source: str) -> Policy:
    plan_index = {plan.name: index for index, plan in enumerate(document.plans)}
    rules = []
    for slot, spec in enumerate(document.rate_limits):

        def per_plan(values: dict[str, Any] | None, fallback: Any) -> tuple[Any, ...]:
            values = values or {}
            return tuple(
                values.get(plan.name, values.get("default", fallback)) for plan in document.plans
            )

        rules.append(
            CompiledRule(
                slot=slot,
                name=spec.name,
                description=spec.description,
                group=spec.group,
                algorithm=spec.algorithm,
                window=spec.window or 0.0,
                lease_ttl=spec.lease_ttl or DEFAULT_LEASE_TTL,
                per=spec.per,
                values=per_plan(spec.limits, UNLIMITED),
                bursts=per_plan(spec.burst, None),
                shadow=spec.mode == "shadow",
                warning_threshold=spec.warning_threshold or document.warning_threshold,
                methods=frozenset(spec.match.methods) if spec.match.methods else None,
                templates=tuple(parse_template(text) for text in spec.match.paths),
                excepts=tuple(parse_template(text) for text in spec.match.except_),
            )
        )
    compiled = tuple(rules)
    issues = []
    for conflict in find_conflicts(compiled):
        second = conflict.second.slot
        position = document.rate_limits[second].match.paths.index(conflict.template.text)
        loc: Loc = ("rate_limits", second, "match", "paths", position)
        issues.append(
            PolicyIssue(
                source,
                located.line_of(loc),
                _field(loc, located.data),
                f"rules {conflict.first.name!r} ({conflict.other_template.text}) and "
                f"{conflict.second.name!r} ({conflict.template.text}) in group "
                f"{conflict.first.group!r} match the same requests with equal specificity; "
                "make one path more specific, restrict methods, or add an except",
            )
        )
    if issues:
        raise PolicyError(issues)
    return Policy(
        source=source,
        document=document,
        plans=document.plans,
        rules=compiled,
        routes=RouteTable(compiled),
        plan_index=plan_index,
    )
