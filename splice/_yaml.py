"""A strict YAML loader for recipes: safe tags only, no duplicate keys, bounded aliases.

PyYAML's ``safe_load`` already refuses ``!!python/...`` tags, but it silently keeps the last
of two equal keys (a recipe with ``density`` twice means one of them is ignored) and expands
aliases without limit (a "billion laughs" document is a few hundred bytes). This loader
refuses both, with a one-line :class:`SpliceError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from splice.errors import SpliceError

__all__ = ["load_yaml", "load_yaml_all"]

MAX_ALIASES = 32  # expansion stays below ~3**(32/3) ≈ 1e5 nodes
MAX_BYTES = 1_000_000


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (possible alias bomb)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_all(source: str | Path) -> list[Any]:
    """Every document of a multi-document YAML text or file (``---`` separated), strictly."""
    return load_yaml(source, all_documents=True)


def load_yaml(source: str | Path, *, all_documents: bool = False) -> Any:
    """Parse YAML text or a file path strictly (see module docstring).

    Raises:
        SpliceError: unreadable file, too large, invalid YAML, unsafe tag, duplicate key,
            alias bomb.
    """
    where = None
    if isinstance(source, Path):
        where = str(source)
        try:
            if source.stat().st_size > MAX_BYTES:
                raise SpliceError(f"file is larger than {MAX_BYTES} bytes", where=where)
            text = source.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpliceError("not UTF-8 text", where=where) from e
        except OSError as e:
            raise SpliceError(f"cannot read: {e.strerror}", where=where) from e
    else:
        text = source
    loader = None
    try:
        loader = _StrictLoader(text)
        if not all_documents:
            return loader.get_single_data()
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if where is not None and mark is not None:
            where = f"{where}:{mark.line + 1}"
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        detail = " ".join(f"{context + ': ' if context else ''}{problem}".split())
        raise SpliceError(
            f"not valid YAML: {detail[:200]}",
            where=where,
            fix="check the syntax; only plain YAML (no python tags, no duplicate keys) is read",
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
