"""Where a value sits in a recipe file: ``recipe.yml:12``, for errors found after parsing.

:func:`line_map` composes the YAML's node tree (no objects are built) and records the line of
every mapping value and list item by its key path (``("slices", 1, "sources", 0,
"layer_range")``); :class:`Where` answers ``file:line`` for a path, or the nearest enclosing
path that has a line, or the bare file name for a recipe given as a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Where", "line_map"]

Key = str | int


def _walk(node: Any, path: tuple[Key, ...], out: dict[tuple[Key, ...], int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                out[(*path, k.value)] = k.start_mark.line + 1
                _walk(v, (*path, k.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), out)


def line_map(text: str) -> list[dict[tuple[Key, ...], int]]:
    """Per YAML document of ``text``, ``key path -> 1-based line``; [] if it does not parse."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return []
    maps = []
    for node in nodes:
        out: dict[tuple[Key, ...], int] = {}
        if node is not None:
            _walk(node, (), out)
        maps.append(out)
    return maps


@dataclass
class Where:
    """``file:line`` of key paths of one recipe document (``what`` is the file or "recipe")."""

    what: str
    lines: dict[tuple[Key, ...], int] = field(default_factory=dict)

    @classmethod
    def of_file(cls, path: Path, doc: int = 0) -> Where:
        maps = line_map(path.read_text(encoding="utf-8"))
        return cls(str(path), maps[doc] if doc < len(maps) else {})

    def __call__(self, *path: Key) -> str:
        """``file:line`` of ``path`` (or of its closest ancestor that has a line)."""
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.what}:{line}" if line is not None else self.what
