"""Multi-document recipes (mergekit-multi): named intermediates, run as a DAG.

A recipe file with several ``---``-separated documents (or one with ``name:``) is a pipeline:
every document is a recipe in either dialect; a document with ``name: X`` writes the
intermediate ``<intermediates>/X``, and any model reference to ``X`` in another document
(``model:``, ``base_model:``, ``base:``, ``path:``, a ``models:`` entry, a tokenizer source;
``X+adapter`` too) reads it. At most one document has no name: it writes the final output.
:func:`read_stages` checks the whole file before anything runs — unique names, every reference
either an intermediate or an existing path, no cycle — and orders the stages so each runs
after the intermediates it reads, once.
"""

from __future__ import annotations

import graphlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import SpliceError, UsageError
from splice.merge.recipe.where import Where, line_map

__all__ = ["Stage", "is_multi", "read_stages"]

_REF_KEYS = {"model", "base_model", "base", "path", "tokenizer_source", "source"}
_NOT_REFS = {"union", "base"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Stage:
    """One document: its recipe (references rewritten to paths), where it writes, what it
    reads."""

    name: str | None
    raw: dict[str, Any]
    where: Where
    out: Path | None
    needs: set[str] = field(default_factory=set)


def is_multi(path: str | Path) -> bool:
    """True for a recipe file with several documents, or one document with ``name:``."""
    p = Path(path)
    if not p.is_file():
        return False
    from splice._yaml import load_yaml_all

    docs = load_yaml_all(p)
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and "name" in docs[0])


def _rewrite(
    value: Any, key: Any, names: set[str], inter: Path | None, stage: Stage, path: tuple
) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite(v, k, names, inter, stage, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        in_models = key == "models"
        return [
            _rewrite(v, "path" if in_models else key, names, inter, stage, (*path, i))
            for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or key not in _REF_KEYS or value in _NOT_REFS:
        return value
    head, plus, tail = value.partition("+")
    if head in names:
        if head == stage.name:
            raise SpliceError(f"document {head!r} reads its own output", where=stage.where(*path))
        stage.needs.add(head)
        assert inter is not None
        return f"{inter / head}{plus}{tail}"
    if not Path(value).exists() and not Path(head).exists():
        raise SpliceError(
            f"{value!r} is neither an intermediate named in this file nor an existing path",
            where=stage.where(*path),
            fix=f"name a document {head!r} (name: {head}) or fix the path",
        )
    return value


def read_stages(path: str | Path, intermediates: Path | None, out: Path | None) -> list[Stage]:
    """The documents of ``path`` as stages in run order (see module docstring).

    Raises:
        SpliceError: a document that is not a mapping, a bad or repeated name, two unnamed
            documents, a reference to nothing, a cycle — naming the file and line.
        UsageError: intermediates but no ``intermediates`` dir; an unnamed document but no
            ``out``.
    """
    from splice._yaml import load_yaml_all

    p = Path(path)
    docs = load_yaml_all(p)
    maps = line_map(p.read_text(encoding="utf-8"))
    stages: list[Stage] = []
    seen: dict[str, Stage] = {}
    for i, doc in enumerate(docs):
        where = Where(str(p), maps[i] if i < len(maps) else {})
        if not isinstance(doc, dict):
            raise SpliceError("each document must be a recipe (a mapping)", where=where())
        raw = dict(doc)
        name = raw.pop("name", None)
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise SpliceError(
                f"name {name!r} is not a plain file name",
                where=where("name"),
                fix="use letters, digits, '.', '_' and '-'",
            )
        if name in seen:
            raise SpliceError(f"two documents are named {name!r}", where=where("name"))
        if name is None and any(s.name is None for s in stages):
            raise SpliceError(
                "two documents have no name; only the final one may be unnamed",
                where=where(),
                fix="add `name: <intermediate>` to every document but the final one",
            )
        stage = Stage(name, raw, where, None)
        stages.append(stage)
        if name is not None:
            seen[name] = stage
    if seen and intermediates is None:
        raise UsageError(
            f"{p}: the recipe has intermediates ({', '.join(seen)})",
            fix="pass --intermediates DIR (intermediates=...) for them",
        )
    for stage in stages:
        stage.raw = _rewrite(stage.raw, None, set(seen), intermediates, stage, ())
        if stage.name is not None:
            assert intermediates is not None
            stage.out = intermediates / stage.name
        elif out is None:
            raise UsageError(f"{p}: the final (unnamed) document needs an output dir")
        else:
            stage.out = Path(out)
    sorter = graphlib.TopologicalSorter({s.name or "": s.needs for s in stages})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1]
        raise SpliceError(
            f"the documents form a cycle: {' -> '.join(cycle)}",
            where=seen[cycle[0]].where("name"),
            fix="an intermediate may only read intermediates that do not read it",
        ) from None
    by_name = {s.name or "": s for s in stages}
    return [by_name[n] for n in order]
