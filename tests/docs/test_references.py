"""Every repository path (``splice/…``, ``tests/…``, ``benchmarks/…``) and dotted
``splice.`` name the docs quote in backticks exists: moving a module without its docs fails
here, not in a reader's terminal (issue #20)."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from tests.docs._markdown import ROOT

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"^((?:splice|tests|benchmarks|docs|fuzz|requirements)/[\w./<>-]*\w)")
NAME = re.compile(r"^(splice(?:\.\w+)+)")
# Keys of the safetensors metadata a merge writes (docs/merging.md), not Python names.
METADATA_KEYS = {"splice.recipe", "splice.seed", "splice.method", "splice.version"}


def quoted() -> list[tuple[str, str]]:
    """(file:line, text) for every backtick span in the docs."""
    out = []
    for doc in DOCS:
        for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{doc.relative_to(ROOT)}:{i}"
            out += [(where, m.group(1)) for m in re.finditer(r"`([^`]+)`", line)]
    return out


def resolves(dotted: str) -> bool:
    """Import the longest importable prefix, then get the rest as attributes; an attribute that
    is a module must be that submodule (not a same-named module bound elsewhere)."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for j in range(k, len(parts)):
            if not hasattr(obj, parts[j]):
                return False
            obj = getattr(obj, parts[j])
            if isinstance(obj, ModuleType) and obj.__name__ != ".".join(parts[: j + 1]):
                return False
        return True
    return False


def test_quoted_paths_exist():
    missing = []
    for where, text in quoted():
        m = PATH.match(text)
        if m and not any(c in m.group(1) for c in "<*") and not (ROOT / m.group(1)).exists():
            missing.append(f"{where}: {m.group(1)}")
    assert not missing, "docs quote paths that do not exist:\n" + "\n".join(missing)


def test_quoted_names_resolve():
    missing = []
    for where, text in quoted():
        m = NAME.match(text)
        if m and m.group(1) not in METADATA_KEYS and not resolves(m.group(1)):
            missing.append(f"{where}: {m.group(1)}")
    assert not missing, "docs quote names that do not resolve:\n" + "\n".join(missing)


def test_checker_catches_a_stale_reference():
    assert resolves("splice.merge.transforms.lines.lines_scale")
    assert not resolves("splice.merge.methods.lines.lines_scale")
    assert not resolves("splice.merge.learned.run_recipe")
    assert (
        PATH.match("tests/merge/test_plan.py") and not (ROOT / "tests/merge/test_plan.py").exists()
    )
