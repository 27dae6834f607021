"""Request paths and the path templates rules match them with.

A request path is normalised to a tuple of segments before any matching, so that no
spelling of a path can dodge its rule: the query and fragment are dropped, percent-escapes
are decoded once *before* splitting (``/api%2Fv1`` counts as ``/api/v1``, the conservative
reading), empty segments (``//``, a trailing ``/``) vanish and ``.``/``..`` are resolved.

A template is ``/``-separated segments, each a literal, ``{name}`` or ``*`` (exactly one
segment), or ``**`` as the last segment (zero or more segments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["LITERAL", "PARAM", "REST", "PathTemplate", "normalise_path", "parse_template"]

LITERAL, PARAM, REST = 0, 1, 2
_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")
_FORBIDDEN_IN_LITERAL = set("{}*?#")


def normalise_path(path: str) -> tuple[str, ...]:
    """The segments of ``path`` as a rule sees them."""
    cut = len(path)
    for mark in ("?", "#"):
        at = path.find(mark)
        if 0 <= at < cut:
            cut = at
    if cut != len(path):
        path = path[:cut]
    if "%" in path:
        path = unquote(path, errors="surrogateescape")
    if path[:1] == "/" and "//" not in path and "/." not in path and path[-1] != "/":
        return tuple(path[1:].split("/"))
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A parsed template: ``segments`` holds (kind, literal text or parameter name)."""

    text: str
    segments: tuple[tuple[int, str], ...]

    @property
    def kinds(self) -> tuple[int, ...]:
        """Specificity key: compared segment by segment, lower is more specific."""
        return tuple(kind for kind, _ in self.segments)

    @property
    def shape(self) -> tuple[tuple[int, str], ...]:
        """Templates with one shape match exactly the same paths (names do not matter)."""
        return tuple((kind, value if kind == LITERAL else "") for kind, value in self.segments)

    def matches(self, segments: tuple[str, ...]) -> bool:
        mine = self.segments
        for index, (kind, value) in enumerate(mine):
            if kind == REST:
                return True
            if index >= len(segments):
                return False
            if kind == LITERAL and segments[index] != value:
                return False
        return len(segments) == len(mine)


def parse_template(text: str) -> PathTemplate:
    """Parse ``text``; ``ValueError`` says which segment is wrong and why."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"{text!r} is not a path template; it must start with '/'")
    raw = text.split("/")[1:]
    if raw and raw[-1] == "" and len(raw) > 1:
        raw = raw[:-1]
    if raw == [""]:
        raw = []
    segments: list[tuple[int, str]] = []
    for index, part in enumerate(raw):
        if part == "":
            raise ValueError(f"{text!r} has an empty segment (a repeated '/')")
        if part == "**":
            if index != len(raw) - 1:
                raise ValueError(f"{text!r}: '**' may only be the last segment")
            segments.append((REST, ""))
        elif part == "*":
            segments.append((PARAM, "*"))
        elif part.startswith("{") or part.endswith("}"):
            if not _PARAM.match(part):
                raise ValueError(
                    f"{text!r}: segment {part!r} is not a parameter; expected {{name}} "
                    "with a letter or '_' first"
                )
            segments.append((PARAM, part[1:-1]))
        elif _FORBIDDEN_IN_LITERAL & set(part):
            raise ValueError(
                f"{text!r}: segment {part!r} mixes text with {{, }}, *, ? or #; "
                "a segment is a literal, {name}, * or a final **"
            )
        else:
            segments.append((LITERAL, unquote(part)))
    return PathTemplate(text=text, segments=tuple(segments))
