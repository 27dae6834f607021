"""The route table: method + path → at most one rule per group, in time independent of
the number of rules.

Precedence inside a group (DESIGN.md): compare the matching templates segment by
segment, literal beats ``{param}``/``*`` beats ``**`` (a template that ends exactly
where the path ends beats a ``**`` that matches nothing); then a method-restricted rule
beats an unrestricted one. A depth-first walk of a segment trie that tries literal
children, then the parameter child, then ``**`` visits matching templates in exactly
that order, so the first unexcluded rule seen for a group is its winner. One trie is
built per method the policy names (plus one for all other methods), which turns the
method rule into a static ordering of the trie's leaves.

Results are memoised by the path's *shape*, not its spelling: a segment that equals no
literal of any template (an id, in practice) can only ever meet a parameter, ``*`` or
``**``, so it is masked before the lookup and ``/users/00u8f3`` and ``/users/00u9x1``
share one entry. Real traffic carries a fresh id in almost every path; keyed by the raw
path, every such request would miss and walk the trie again. Each distinct outcome gets
a small number, its ``route id``, which the engine keys what it computes per route by,
so that too is shared by every path that matched the same rules.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tenantguard._paths import LITERAL, PARAM, REST, PathTemplate, normalise_path
from tenantguard._rules import CompiledRule

__all__ = ["Candidate", "Conflict", "RouteTable", "find_conflicts"]

_SHAPES = 65_536  # cached shapes; when full, the table starts again
_LITERAL_PATHS = 8_192  # paths of literals only, kept as sent
_LITERAL_PATH = 256  # characters at most of such a path
Entry = tuple[CompiledRule, PathTemplate]


class _Node:
    __slots__ = ("end", "literal", "param", "rest")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.rest: list[Entry] = []
        self.end: list[Entry] = []


@dataclass(frozen=True, slots=True)
class Candidate:
    """A rule whose template matches a request, in precedence order (for ``explain``)."""

    rule: CompiledRule
    template: PathTemplate
    excluded: bool


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two rules of one group that tie on some request."""

    first: CompiledRule
    second: CompiledRule
    template: PathTemplate
    other_template: PathTemplate


def _restricted_first(entries: list[Entry]) -> None:
    entries.sort(key=lambda entry: (entry[0].methods is None, entry[0].slot))


class RouteTable:
    def __init__(self, rules: tuple[CompiledRule, ...]) -> None:
        self.rules = rules
        self.groups = tuple(dict.fromkeys(rule.group for rule in rules))
        methods = sorted({method for rule in rules for method in rule.methods or ()})
        self._tries = {method: self._build(method) for method in methods}
        self._other = self._build(None)
        templates = [t for rule in rules for t in (*rule.templates, *rule.excepts)]
        # a literal maps to itself, the template's own string: a shape holds only those
        # (and ""), never a request's own strings, so its size is bounded by the policy
        self._literals = {
            value: value
            for template in templates
            for kind, value in template.segments
            if kind == LITERAL
        }
        self._depth = 1 + max((len(t.segments) for t in templates), default=0)
        """Segments that can tell paths apart: past the deepest template only ``**``
        matches, whatever the rest says, so a shape keeps this many at most."""
        self._shapes: dict[tuple[str, ...], int] = {}
        self._literal_paths: dict[tuple[str, str], int] = {}
        self._learning = threading.Lock()
        self._ids: dict[tuple[CompiledRule, ...], int] = {}
        self.matched: list[tuple[CompiledRule, ...]] = []
        """``matched[route_id]``: the rules a route id stands for. Grows with the number
        of distinct outcomes, which the policy bounds (one rule or none per group)."""

    def _build(self, method: str | None) -> _Node:
        root = _Node()
        for rule in self.rules:
            if rule.methods is not None and method not in rule.methods:
                continue
            for template in rule.templates:
                node = root
                for kind, value in template.segments:
                    if kind == REST:
                        node.rest.append((rule, template))
                        break
                    if kind == LITERAL:
                        node = node.literal.setdefault(value, _Node())
                    else:
                        node.param = node.param or _Node()
                        node = node.param
                else:
                    node.end.append((rule, template))
        stack = [root]
        while stack:
            node = stack.pop()
            _restricted_first(node.end)
            _restricted_first(node.rest)
            stack.extend(node.literal.values())
            if node.param is not None:
                stack.append(node.param)
        return root

    def match(self, method: str, path: str) -> tuple[CompiledRule, ...]:
        """The winning rule of each group that has one, in the policy's group order."""
        return self.matched[self.route_id(method, path)]

    def route_id(self, method: str, path: str) -> int:
        """A number for the rules ``method`` and ``path`` match; equal for every request
        that matches the same rules (see the module docstring)."""
        known = self._literal_paths.get((method, path))
        if known is not None:
            return known
        literal = self._literals.get
        if (
            path[:1] == "/"
            and path[-1] != "/"
            and not ("?" in path or "#" in path or "%" in path or "//" in path or "/." in path)
        ):  # already normal, as nearly every path is: normalise_path's own fast path, inline
            parts: Sequence[str] = path[1:].split("/")
        else:
            parts = normalise_path(path)
        key = (method, *[literal(part, "") for part in parts[: self._depth]])
        found = self._shapes.get(key)
        if found is None:
            found = self._learn(key)
        if "" not in key and len(path) <= _LITERAL_PATH and "?" not in path:
            # every segment a literal (a collection route, say): such paths repeat, and
            # the next one skips the split. A path with an id, or a query (a cursor, a
            # filter), seldom repeats, so it never enters
            literal_paths = self._literal_paths
            if len(literal_paths) >= _LITERAL_PATHS:
                literal_paths.clear()
            literal_paths[method, path] = found
        return found

    def _learn(self, key: tuple[str, ...]) -> int:
        # masked segments ("") equal no literal, so walking the key walks the path
        result = self._walk_groups(key[0], key[1:])
        with self._learning:  # ids are handed out once each, whatever the threads
            found = self._ids.get(result)
            if found is None:
                self.matched.append(result)
                found = self._ids[result] = len(self.matched) - 1
            if len(self._shapes) >= _SHAPES:
                self._shapes.clear()
            self._shapes[key] = found
        return found

    def _walk_groups(self, method: str, segments: tuple[str, ...]) -> tuple[CompiledRule, ...]:
        found: dict[str, CompiledRule] = {}
        wanted = len(self.groups)
        for rule, _template in self._walk(self._trie(method), segments, 0):
            if rule.group not in found and not (rule.excepts and rule.excluded(segments)):
                found[rule.group] = rule
                if len(found) == wanted:
                    break
        return tuple(found[group] for group in self.groups if group in found)

    def candidates(self, method: str, path: str) -> list[Candidate]:
        """Every matching template in precedence order, excluded ones flagged."""
        segments = normalise_path(path)
        return [
            Candidate(rule, template, rule.excluded(segments))
            for rule, template in self._walk(self._trie(method), segments, 0)
        ]

    def _trie(self, method: str) -> _Node:
        trie = self._tries.get(method)
        if trie is None:
            trie = self._tries.get(method.upper(), self._other)
        return trie

    def _walk(self, node: _Node, segments: tuple[str, ...], depth: int) -> Iterator[Entry]:
        if depth == len(segments):
            yield from node.end
        else:
            child = node.literal.get(segments[depth])
            if child is not None:
                yield from self._walk(child, segments, depth + 1)
            if node.param is not None:
                yield from self._walk(node.param, segments, depth + 1)
        yield from node.rest


def find_conflicts(rules: tuple[CompiledRule, ...]) -> list[Conflict]:
    """Pairs of rules in one group that would tie on some request.

    Two templates can match one path with equal specificity only if they have the same
    shape (same kinds, same literals); the tie then stands unless one rule restricts
    methods and the other does not, or their methods are disjoint, or one rule excepts
    that very shape.
    """
    seen: dict[tuple[str, tuple[tuple[int, str], ...]], list[Entry]] = {}
    conflicts: list[Conflict] = []
    for rule in rules:
        excepted = {template.shape for template in rule.excepts}
        for template in rule.templates:
            if template.shape in excepted:
                continue
            key = (rule.group, template.shape)
            for other, other_template in seen.get(key, []):
                if other is rule or (rule.methods is None) != (other.methods is None):
                    continue
                if (
                    rule.methods is not None
                    and other.methods is not None
                    and not (rule.methods & other.methods)
                ):
                    continue
                conflicts.append(
                    Conflict(
                        first=other, second=rule, template=template, other_template=other_template
                    )
                )
            seen.setdefault(key, []).append((rule, template))
    return conflicts


def precedence_reason(winner: Candidate, loser: Candidate) -> str:
    """Which precedence step put ``winner`` ahead of ``loser`` (for ``explain``)."""
    names = {LITERAL: "a literal", PARAM: "a parameter", REST: "'**'"}
    mine, theirs = winner.template.segments, loser.template.segments
    for index in range(max(len(mine), len(theirs))):
        a = mine[index][0] if index < len(mine) else None
        b = theirs[index][0] if index < len(theirs) else None
        if a != b:
            left = names[a] if a is not None else "the end of the path"
            right = names[b] if b is not None else "the end of the path"
            return f"segment {index + 1}: {left} beats {right}"
    if winner.rule.methods is not None and loser.rule.methods is None:
        return "same path specificity; a method-restricted rule beats an unrestricted one"
    return "earlier in precedence order"
