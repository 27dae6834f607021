"""Every kind of policy error names the file, the line, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantguard import PolicyError, load_policy, parse_policy

BASE = """\
version: 1
plans:
  - {name: free, enforcement: hard}
  - {name: pro, enforcement: soft}
default_plan: free
rate_limits:
  - name: apps
    match: {paths: [/api/apps]}
    window: 1m
    limits: {free: 10, pro: 20}
"""

SECOND_RULE = """\
  - name: {name}
    match: {{paths: ["{path}"]{methods}}}
    window: 1m
    limits: {{default: 1}}
"""


def rule(name: str, path: str, methods: str = "") -> str:
    extra = f", methods: [{methods}]" if methods else ""
    return SECOND_RULE.format(name=name, path=path, methods=extra)


def errors_of(text: str, tmp_path: Path) -> PolicyError:
    file = tmp_path / "policy.yaml"
    file.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(file)
    return caught.value


CASES = [
    # (id, text, line, field, words the message must contain)
    ("yaml-syntax", "version: 1\nplans: [\n  {name: a\n", 4, "", ["not valid YAML"]),
    (
        "misspelt-key",
        BASE + "    widnow: 1m\n",
        11,
        "rate_limits[0] (apps).widnow",
        ["unknown key 'widnow' (did you mean 'window'?)", "expected one of"],
    ),
    (
        "unknown-value",
        BASE.replace("version: 1\n", "version: 1\nerrors: oktaa\n"),
        2,
        "errors",
        ["expected 'problem+json', 'okta' or 'logto', got 'oktaa'"],
    ),
    (
        "unknown-key",
        BASE + "    colour: blue\n",
        11,
        "rate_limits[0] (apps).colour",
        ["unknown key 'colour'", "expected one of", "window"],
    ),
    (
        "unknown-plan-in-limits",
        BASE.replace("pro: 20", "pro: 20, gold: 5"),
        10,
        "rate_limits[0] (apps).limits.gold",
        ["names no plan", "free, pro or default"],
    ),
    (
        "plan-missing-from-limits",
        BASE.replace("{free: 10, pro: 20}", "{free: 10}"),
        10,
        "rate_limits[0] (apps).limits",
        ["no value for plan(s) pro", "default"],
    ),
    (
        "bad-duration",
        BASE.replace("window: 1m", "window: 1 minute"),
        9,
        "rate_limits[0] (apps).window",
        ["'1 minute' is not a duration", "10s, 1m"],
    ),
    (
        "duration-without-unit",
        BASE.replace("window: 1m", "window: 60"),
        9,
        "rate_limits[0] (apps).window",
        ["expected a duration", "got 60"],
    ),
    (
        "bad-path-template",
        BASE.replace("[/api/apps]", '["/api/{id"]'),
        8,
        "rate_limits[0] (apps).match.paths[0]",
        ["'{id' is not a parameter"],
    ),
    (
        "rest-not-last",
        BASE.replace("[/api/apps]", '["/api/**/x"]'),
        8,
        "rate_limits[0] (apps).match.paths[0]",
        ["'**' may only be the last segment"],
    ),
    (
        "duplicate-rule-name",
        BASE + rule("apps", "/x"),
        11,
        "rate_limits[1] (apps).name",
        ["duplicate rule name 'apps'", "rate_limits[0]"],
    ),
    (
        "unknown-algorithm",
        BASE.replace("window: 1m", "window: 1m\n    algorithm: leaky"),
        10,
        "rate_limits[0] (apps).algorithm",
        ["'token-bucket'", "got 'leaky'"],
    ),
    (
        "negative-limit",
        BASE.replace("free: 10", "free: -1"),
        10,
        "rate_limits[0] (apps).limits.free",
        ["whole number >= 0", "got -1"],
    ),
    (
        "counts-toward-missing-quota",
        BASE + "quotas:\n  - name: m2m\n    counts_toward: [apps]\n    limits: {default: 1}\n",
        13,
        "quotas[0] (m2m).counts_toward[0]",
        ["names no quota 'apps'"],
    ),
    (
        "ambiguous-rules",
        BASE + rule("by-id", "/api/{id}") + rule("by-star", "/api/*"),
        16,
        "rate_limits[2] (by-star).match.paths[0]",
        ["'by-id' (/api/{id})", "'by-star' (/api/*)", "equal specificity"],
    ),
    (
        "ambiguous-overlapping-methods",
        BASE + rule("a", "/x/{id}", "GET, PUT") + rule("b", "/x/{n}", "PUT"),
        16,
        "rate_limits[2] (b).match.paths[0]",
        ["'a'", "'b'"],
    ),
    (
        "duplicate-yaml-key",
        BASE.replace("window: 1m", "window: 1m\n    window: 2m"),
        10,
        "rate_limits[0].window",
        ["duplicate key 'window'", "line 9"],
    ),
    (
        "window-missing",
        BASE.replace("    window: 1m\n", ""),
        7,
        "rate_limits[0] (apps)",
        ["window is required"],
    ),
    ("unknown-version", BASE.replace("version: 1", "version: 2"), 1, "version", ["got 2"]),
    (
        "default-plan-unknown",
        BASE.replace("default_plan: free", "default_plan: gold"),
        5,
        "default_plan",
        ["names no plan", "free, pro"],
    ),
    (
        "bad-method",
        BASE.replace("[/api/apps]}", "[/api/apps], methods: [G E T]}"),
        8,
        "rate_limits[0] (apps).match.methods[0]",
        ["HTTP method"],
    ),
    (
        "bad-per",
        BASE.replace("window: 1m", "window: 1m\n    per: [tenant, cookie]"),
        10,
        "rate_limits[0] (apps).per[1]",
        ["header:<name>", "'cookie'"],
    ),
    (
        "burst-on-fixed-window",
        BASE.replace("window: 1m", "window: 1m\n    burst: {default: 5}"),
        10,
        "rate_limits[0] (apps).burst",
        ["token-bucket and gcra"],
    ),
    (
        "concurrency-with-window",
        BASE.replace("window: 1m", "window: 1m\n    algorithm: concurrency"),
        9,
        "rate_limits[0] (apps).window",
        ["lease_ttl"],
    ),
    (
        "counts-toward-cycle",
        BASE + "quotas:\n  - name: a\n    counts_toward: [b]\n    limits: {default: 1}\n"
        "  - name: b\n    counts_toward: [a]\n    limits: {default: 1}\n",
        13,
        "quotas[0] (a).counts_toward",
        ["cycle"],
    ),
    (
        "entitlement-unknown-plan",
        BASE + "entitlements:\n  retention: {gold: 14d}\n",
        12,
        "entitlements.retention.gold",
        ["names no plan"],
    ),
    ("not-a-mapping", "- just\n- a list\n", 1, "", ["expected a mapping"]),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_error_names_file_line_field(
    text: str, line: int, field: str, words: list[str], tmp_path: Path
) -> None:
    error = errors_of(text, tmp_path)
    issue = error.issues[0]
    assert issue.file == str(tmp_path / "policy.yaml")
    assert issue.line == line, str(error)
    assert issue.field == field, str(error)
    for word in words:
        assert word in issue.message, str(error)
    assert str(error).startswith(f"{tmp_path / 'policy.yaml'}:{line}: ")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE.replace("free: 10", "free: -1").replace("window: 1m", "window: soon")
    error = errors_of(text, tmp_path)
    assert {issue.field for issue in error.issues} == {
        "rate_limits[0] (apps).limits.free",
        "rate_limits[0] (apps).window",
    }


def test_recursive_anchor_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="refers to itself"):
        parse_policy("a: &a [*a]\n")


def test_value_and_name_problems_are_reported_together(tmp_path: Path) -> None:
    text = BASE.replace("window: 1m", "window: 1 minute").replace("pro: 20", "prro: 20") + rule(
        "apps", "/other"
    )
    error = errors_of(text, tmp_path)
    assert [issue.field for issue in error.issues] == [
        "rate_limits[0] (apps).window",
        "rate_limits[0] (apps).limits.prro",
        "rate_limits[0] (apps).limits",
        "rate_limits[1] (apps).name",
    ]


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_disjoint_methods_never_conflict() -> None:
    policy = parse_policy(BASE + rule("get-x", "/x/{id}", "GET") + rule("put-x", "/x/{n}", "PUT"))
    assert [r.name for r in policy.routes.match("GET", "/x/1")] == ["get-x"]
    assert [r.name for r in policy.routes.match("PUT", "/x/1")] == ["put-x"]


def test_restricted_and_unrestricted_do_not_conflict() -> None:
    policy = parse_policy(BASE + rule("any-x", "/x/{id}") + rule("get-x", "/x/{n}", "GET"))
    assert [r.name for r in policy.routes.match("GET", "/x/1")] == ["get-x"]
    assert [r.name for r in policy.routes.match("DELETE", "/x/1")] == ["any-x"]


def test_except_of_the_same_shape_resolves_a_tie() -> None:
    text = (
        BASE
        + rule("all", "/y/{id}")
        + rule("one", "/y/{id}").replace(
            'paths: ["/y/{id}"]', 'paths: ["/y/{id}"], except: ["/y/{x}"]'
        )
    )
    policy = parse_policy(text)
    assert [r.name for r in policy.routes.match("GET", "/y/1")] == ["all"]


def test_valid_policy_is_immutable() -> None:
    policy = parse_policy(BASE)
    with pytest.raises(ValueError, match="frozen"):
        policy.document.rate_limits[0].window = 5.0  # type: ignore[misc]
