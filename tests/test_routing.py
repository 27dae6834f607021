"""The route table: normalisation, precedence, and lookup cost."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantguard import parse_policy
from tenantguard._paths import normalise_path, parse_template
from tenantguard._routing import RouteTable

HEAD = """\
version: 1
plans: [{name: free, enforcement: hard}]
default_plan: free
rate_limits:
"""


def policy_with(*rules: tuple[str, str, str]) -> str:
    """rules: (name, paths as YAML flow list, extra YAML on the match line)."""
    text = HEAD
    for name, paths, extra in rules:
        text += (
            f"  - name: {name}\n    match: {{paths: {paths}{extra}}}\n"
            f"    window: 1m\n    limits: {{default: 10}}\n"
        )
    return text


@pytest.mark.parametrize(
    ("raw", "segments"),
    [
        ("/api/v1/apps", ("api", "v1", "apps")),
        ("/api/v1/apps/", ("api", "v1", "apps")),
        ("//api///v1/apps", ("api", "v1", "apps")),
        ("/api/v1/apps?limit=5", ("api", "v1", "apps")),
        ("/api/v1/apps#frag", ("api", "v1", "apps")),
        ("/api/v1/%61pps", ("api", "v1", "apps")),
        ("/api%2Fv1/apps", ("api", "v1", "apps")),
        ("/api/v1/./apps", ("api", "v1", "apps")),
        ("/api/v1/x/../apps", ("api", "v1", "apps")),
        ("/../../api/v1/apps", ("api", "v1", "apps")),
        ("/", ()),
        ("", ()),
    ],
)
def test_normalise(raw: str, segments: tuple[str, ...]) -> None:
    assert normalise_path(raw) == segments


SPELLINGS = [
    "/api/v1/apps",
    "/api/v1/apps/",
    "/api//v1/apps",
    "/api/v1/apps?x=1",
    "/api/v1/%61pps",
    "/api%2Fv1%2Fapps",
    "/api/v1/./apps",
    "/api/v1/z/../apps",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_no_spelling_dodges_its_rule(spelling: str) -> None:
    policy = parse_policy(policy_with(("apps", "[/api/v1/apps]", ""), ("rest", '["/**"]', "")))
    assert [rule.name for rule in policy.routes.match("GET", spelling)] == ["apps"]


def test_precedence_literal_param_rest() -> None:
    policy = parse_policy(
        policy_with(
            ("lit", '["/a/b/c"]', ""),
            ("param", '["/a/{x}/c"]', ""),
            ("rest", '["/a/**"]', ""),
            ("root", '["/**"]', ""),
        )
    )

    def winner(path: str) -> str:
        return policy.routes.match("GET", path)[0].name

    assert winner("/a/b/c") == "lit"
    assert winner("/a/z/c") == "param"
    assert winner("/a/b/d") == "rest"
    assert winner("/a") == "rest"  # ** matches zero segments
    assert winner("/b") == "root"


def test_exact_end_beats_rest_matching_nothing() -> None:
    policy = parse_policy(policy_with(("exact", '["/a"]', ""), ("below", '["/a/**"]', "")))
    assert policy.routes.match("GET", "/a")[0].name == "exact"
    assert policy.routes.match("GET", "/a/b")[0].name == "below"


def test_earlier_segment_decides_first() -> None:
    # /a/{x}/c/d vs /a/b/** on /a/b/c/d: segment 2 literal 'b' wins although the other
    # template is literal further on
    policy = parse_policy(policy_with(("p", '["/a/{x}/c/d"]', ""), ("l", '["/a/b/**"]', "")))
    assert policy.routes.match("GET", "/a/b/c/d")[0].name == "l"


def test_method_restricted_beats_unrestricted() -> None:
    policy = parse_policy(
        policy_with(("any", '["/u/{id}"]', ""), ("get", '["/u/{id}"]', ", methods: [GET]"))
    )
    assert policy.routes.match("GET", "/u/1")[0].name == "get"
    assert policy.routes.match("get", "/u/1")[0].name == "get"
    assert policy.routes.match("POST", "/u/1")[0].name == "any"
    assert policy.routes.match("PURGE", "/u/1")[0].name == "any"


def test_except_falls_through_to_next_candidate() -> None:
    policy = parse_policy(
        policy_with(
            ("coll", '["/apps", "/apps/**"]', ', except: ["/apps/{id}/secret"]'),
            ("root", '["/**"]', ""),
        )
    )
    assert policy.routes.match("GET", "/apps/1/other")[0].name == "coll"
    assert policy.routes.match("GET", "/apps/1/secret")[0].name == "root"


def test_one_rule_per_group_and_every_group() -> None:
    text = policy_with(("a", '["/x/**"]', ""), ("b", '["/x/y"]', "")) + (
        "  - name: bucket\n    group: tenant\n    match: {paths: ['/**']}\n"
        "    algorithm: token-bucket\n    window: 10s\n    limits: {default: 200}\n"
    )
    policy = parse_policy(text)
    assert [r.name for r in policy.routes.match("GET", "/x/y")] == ["b", "bucket"]
    assert [r.name for r in policy.routes.match("GET", "/z")] == ["bucket"]


def test_templates_with_names_and_stars_share_a_shape() -> None:
    assert parse_template("/a/{id}/b").shape == parse_template("/a/*/b").shape
    assert parse_template("/a/{id}/b").shape != parse_template("/a/{id}/c").shape


class CountingTable(RouteTable):
    """Counts trie nodes visited, to show the walk does not scan rules."""

    visits = 0

    def _walk(self, node, segments, depth):  # type: ignore[no-untyped-def]
        CountingTable.visits += 1
        return super()._walk(node, segments, depth)


@pytest.mark.parametrize("extra_rules", [0, 10, 5000])
def test_lookup_cost_does_not_grow_with_rules(extra_rules: int) -> None:
    rules = [("target", '["/api/v1/users/{id}"]', ""), ("other", '["/api/**"]', "")]
    rules += [(f"r{i}", f'["/api/v1/thing{i}/{{id}}"]', "") for i in range(extra_rules)]
    policy = parse_policy(policy_with(*rules))
    table = CountingTable(policy.rules)
    CountingTable.visits = 0
    assert table.match("GET", "/api/v1/users/42")[0].name == "target"
    # root, api, v1, users, {id}: a fixed number of nodes whatever the rule count
    assert CountingTable.visits == 5


def _reference(table: RouteTable, method: str, path: str) -> tuple[str, ...]:
    """The winner of each group read off the full candidate list, no shape cache."""
    found: dict[str, str] = {}
    for candidate in table.candidates(method, path):
        if not candidate.excluded:
            found.setdefault(candidate.rule.group, candidate.rule.name)
    return tuple(found[group] for group in table.groups if group in found)


OKTA = parse_policy(
    (Path(__file__).parent.parent / "examples" / "okta-management.yaml").read_text(),
    source="okta-management.yaml",
)
_LITERALS = sorted(
    {value for rule in OKTA.rules for t in rule.templates for kind, value in t.segments if not kind}
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "get", "PATCH"]),
    segments=st.lists(
        st.one_of(
            st.sampled_from(_LITERALS),
            st.text(alphabet="abc0u%2F.", min_size=1, max_size=6),
        ),
        max_size=7,
    ),
    tail=st.sampled_from(["", "/", "?q=1", "#x", "//"]),
)
def test_shared_shapes_match_exactly_what_a_full_walk_matches(
    method: str, segments: list[str], tail: str
) -> None:
    path = "/" + "/".join(segments) + tail
    names = tuple(rule.name for rule in OKTA.routes.match(method, path))
    assert names == _reference(OKTA.routes, method, path)


def test_paths_differing_only_in_ids_share_one_route_id() -> None:
    routes = OKTA.routes
    first = routes.route_id("GET", "/api/v1/users/00u1")
    assert routes.route_id("GET", "/api/v1/users/00u2xyz") == first
    assert routes.route_id("GET", "/api/v1/users/00u3/") == first  # spelled otherwise
    assert routes.route_id("GET", "/api/v1/apps/0oa1") != first
    # another shape (a literal of some template is never masked), the same rules: one id
    assert routes.route_id("GET", "/api/v1/users/apps") == first


def test_route_ids_stay_few_whatever_the_number_of_paths() -> None:
    table = parse_policy(policy_with(("by-id", '["/items/{id}"]', ""))).routes
    for index in range(20_000):
        table.route_id("GET", f"/items/{index}")
        table.route_id("GET", f"/other/{index}/x")
    assert len(table.matched) == 2  # the rule, and no rule
