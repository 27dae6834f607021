"""YAML to plain data, remembering the line of every mapping key and list item.

Policy errors must name the line, so the document is composed into nodes first and
converted by hand: each value's path (``("rate_limits", 3, "limits")``) maps to the line
it starts on. Duplicate keys, which PyYAML silently lets the last one win, are errors.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["Located", "YamlError", "load_located"]

Path = tuple[str | int, ...]


class YamlError(Exception):
    """The text is not YAML, or not YAML a policy can be (duplicate keys)."""

    def __init__(self, line: int | None, field: str, message: str) -> None:
        self.line = line
        self.field = field
        self.message = message
        super().__init__(message)


class Located:
    """Parsed data plus the line of every path in it."""

    def __init__(self, data: Any, lines: dict[Path, int]) -> None:
        self.data = data
        self.lines = lines

    def line_of(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest ancestor that appears in the file."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


def load_located(text: str) -> Located:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Path, int] = {}
        data = None if node is None else _convert(loader, node, (), lines)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise YamlError(line, "", f"not valid YAML: {problem}") from error
    except yaml.YAMLError as error:
        raise YamlError(None, "", f"not valid YAML: {error}") from error
    except RecursionError as error:
        raise YamlError(None, "", "an alias refers to itself (a recursive anchor)") from error
    finally:
        loader.dispose()
    return Located(data, lines)


def _convert(loader: yaml.SafeLoader, node: Node, path: Path, lines: dict[Path, int]) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise YamlError(
                    key_node.start_mark.line + 1, _dotted(path), f"key {key!r} must be text"
                )
            key = str(key)
            if key in out:
                raise YamlError(
                    key_node.start_mark.line + 1,
                    _dotted((*path, key)),
                    f"duplicate key {key!r} (first set on line {lines[(*path, key)]})",
                )
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _convert(loader, value_node, (*path, key), lines)
        return out
    if isinstance(node, SequenceNode):
        return [
            _convert(loader, item, (*path, index), lines) for index, item in enumerate(node.value)
        ]
    if not isinstance(node, ScalarNode):
        raise YamlError(node.start_mark.line + 1, _dotted(path), "unsupported YAML node")
    return loader.construct_object(node, deep=True)


def _dotted(path: Path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
