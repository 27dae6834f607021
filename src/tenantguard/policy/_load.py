"""Reading a policy file: YAML → document → cross-field checks → compiled policy.

Every problem becomes a ``PolicyIssue`` naming file, line, field and what was expected;
all problems of a stage are reported together so one edit-check cycle fixes them all.
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tenantguard._paths import parse_template
from tenantguard._routing import RouteTable, find_conflicts
from tenantguard._rules import CompiledQuota, CompiledRule
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
    issues = _Checker(located, source).run()
    try:
        document = PolicyDocument.model_validate(located.data)
    except ValidationError as error:
        issues = _validation_issues(error, located, source) + issues
    if issues:
        issues.sort(key=lambda issue: issue.line or 0)
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
            close = get_close_matches(str(loc[-1]), parent, n=1)
            message = f"unknown key {loc[-1]!r}"
            if close:
                message += f" (did you mean {close[0]!r}?)"
            if parent:
                message += f"; expected one of: {', '.join(parent)}"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "literal_error":
            allowed = problem.get("ctx", {}).get("expected", "")
            message = f"expected {allowed}, got {problem.get('input')!r}"
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


def _items(data: Any, section: str) -> list[tuple[int, dict[str, Any]]]:
    """The mapping entries of a list section, with their indices; anything else skipped
    (its shape is already reported by validation)."""
    items = data.get(section) if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    return [(index, item) for index, item in enumerate(items) if isinstance(item, dict)]


def _strings(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


class _Checker:
    """Cross-field rules, each problem located at the field that breaks it.

    It reads the raw data, not the validated document, so that it can run even when
    some field failed validation: one ``check`` reports a bad window and a misspelt plan
    together rather than one per edit.
    """

    def __init__(self, located: Located, source: str) -> None:
        self.data = located.data
        self.located = located
        self.source = source
        self.issues: list[PolicyIssue] = []
        self.plans = [
            item["name"]
            for _, item in _items(self.data, "plans")
            if isinstance(item.get("name"), str)
        ]

    def problem(self, loc: Loc, message: str) -> None:
        line = self.located.line_of(loc)
        self.issues.append(PolicyIssue(self.source, line, _field(loc, self.data), message))

    def run(self) -> list[PolicyIssue]:
        plans = _items(self.data, "plans")
        rules = _items(self.data, "rate_limits")
        quotas = _items(self.data, "quotas")
        self.unique(plans, "plans", "plan")
        default = self.data.get("default_plan")
        if isinstance(default, str) and self.plans and default not in self.plans:
            self.problem(
                ("default_plan",), f"names no plan; expected one of: {', '.join(self.plans)}"
            )
        self.unique(rules, "rate_limits", "rule")
        self.unique(quotas, "quotas", "quota")
        for index, rule in rules:
            self.rate_limit(index, rule)
        by_name = {
            quota["name"]: quota for _, quota in quotas if isinstance(quota.get("name"), str)
        }
        for index, quota in quotas:
            self.per_plan(("quotas", index, "limits"), quota.get("limits"))
            for position, target in enumerate(_strings(quota.get("counts_toward"))):
                loc: Loc = ("quotas", index, "counts_toward", position)
                if target not in by_name:
                    self.problem(
                        loc, f"names no quota {target!r}; expected one of: {', '.join(by_name)}"
                    )
                elif target == quota.get("name"):
                    self.problem(loc, "a quota cannot count toward itself")
                elif by_name[target].get("period") != quota.get("period"):
                    theirs = by_name[target].get("period") or "lifetime"
                    self.problem(
                        loc,
                        f"{target!r} is counted per {theirs}, this quota per "
                        f"{quota.get('period') or 'lifetime'}; both must agree",
                    )
        self.cycles(quotas, by_name)
        entitlements = self.data.get("entitlements")
        if isinstance(entitlements, dict):
            for name, values in entitlements.items():
                self.per_plan(("entitlements", name), values)
        return self.issues

    def unique(self, items: list[tuple[int, dict[str, Any]]], section: str, what: str) -> None:
        first: dict[str, int] = {}
        for index, item in items:
            name = item.get("name")
            if not isinstance(name, str):
                continue
            if name in first:
                self.problem(
                    (section, index, "name"),
                    f"duplicate {what} name {name!r} (also {section}[{first[name]}])",
                )
            else:
                first[name] = index

    def per_plan(self, loc: Loc, values: Any, *, required: bool = True) -> None:
        if not isinstance(values, dict) or not self.plans:
            return
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

    def rate_limit(self, index: int, rule: dict[str, Any]) -> None:
        loc: Loc = ("rate_limits", index)
        algorithm = rule.get("algorithm", "fixed-window")
        self.per_plan((*loc, "limits"), rule.get("limits"))
        if rule.get("burst") is not None:
            self.per_plan((*loc, "burst"), rule["burst"], required=False)
            if algorithm not in ("token-bucket", "gcra"):
                self.problem(
                    (*loc, "burst"), f"burst applies to token-bucket and gcra, not {algorithm}"
                )
        if algorithm == "concurrency":
            if "window" in rule:
                self.problem(
                    (*loc, "window"),
                    "a concurrency rule has no window; use lease_ttl for how long an "
                    "unreleased lease holds its slot",
                )
        else:
            if "window" not in rule:
                self.problem(
                    loc, f"window is required for {algorithm}; expected a duration such as 1m"
                )
            if "lease_ttl" in rule:
                self.problem((*loc, "lease_ttl"), "lease_ttl applies to concurrency rules only")

    def cycles(self, quotas: list[tuple[int, dict[str, Any]]], by_name: dict[str, Any]) -> None:
        for index, quota in quotas:
            seen: set[str] = set()
            todo = _strings(quota.get("counts_toward"))
            while todo:
                name = todo.pop()
                if name == quota.get("name"):
                    self.problem(
                        ("quotas", index, "counts_toward"),
                        "counts_toward forms a cycle back to this quota",
                    )
                    break
                if name in seen or name not in by_name:
                    continue
                seen.add(name)
                todo.extend(_strings(by_name[name].get("counts_toward")))


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
        quotas=_compile_quotas(document),
        entitlements={
            name: tuple(values.get(plan.name, values.get("default")) for plan in document.plans)
            for name, values in document.entitlements.items()
        },
        rules_by_name={rule.name: rule for rule in compiled},
    )


def _compile_quotas(document: PolicyDocument) -> dict[str, CompiledQuota]:
    specs = {quota.name: quota for quota in document.quotas}

    def toward(name: str) -> tuple[str, ...]:
        # transitively; the loader has already refused cycles
        out: list[str] = []
        for target in specs[name].counts_toward:
            for found in (target, *toward(target)):
                if found not in out:
                    out.append(found)
        return tuple(out)

    return {
        quota.name: CompiledQuota(
            name=quota.name,
            description=quota.description,
            values=tuple(
                quota.limits.get(plan.name, quota.limits.get("default", UNLIMITED))
                for plan in document.plans
            ),
            counts_toward=toward(quota.name),
            per=quota.per,
            period=quota.period,
            warning_threshold=quota.warning_threshold or document.warning_threshold,
        )
        for quota in document.quotas
    }
