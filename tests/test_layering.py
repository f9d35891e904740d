"""The folder tree is the architecture (issue #20, deliverable 5; docs/design.md, CONTRIBUTING.md).

Stages, in order; a module may import its own stage package and stages to its left, never
to its right:

    foundation (splice/__init__, errors, _registry, _yaml, _schema, _names) → io → deltas
    → {adapters, merge, select, continual, convert, compress, decode, probe, analysis,
       domains}
    → data → train → bench → cli

Among the siblings in braces only the edges in ``SIBLINGS`` are allowed (merge → adapters;
the later siblings → adapters and the shared hooks in probe), so no package-level import
cycle can exist. A top-level module not in ``STAGE`` is foundation
if it imports no stage, else it sits in the latest stage it imports.

``test_no_upward_import``: every module under splice/ (found on disk) is imported in a
fresh process, forked from one interpreter that preloaded the third-party libraries and no
splice module; an import hook records which splice module executed the import of which
(the first import of each module). Every recorded edge is checked; a violation names the
edge and the chain from the imported root. ``test_import_splice_self_time``: ``import
splice`` costs ≤ 0.1 s of its own. ``test_structure``: file sizes and the merge/ layout.

``KNOWN_VIOLATIONS`` lists violations accepted for a while (none since the issue #20 layout):
the tests fail on a new one, and on a listed one that no longer occurs (then delete it).
"""

from __future__ import annotations

import ast
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "splice"

ORDER = ["foundation", "io", "deltas", "siblings", "data", "train", "bench", "cli"]
STAGE = {
    **dict.fromkeys(["", "errors", "_registry", "_yaml", "_schema", "_names"], "foundation"),
    "io": "io",
    "deltas": "deltas",
    **{s: "siblings" for s in ["adapters", "merge", "select", "continual", "convert"]},
    **{s: "siblings" for s in ["compress", "decode", "probe", "analysis", "domains"]},
    "data": "data",
    "train": "train",
    "bench": "bench",
    "cli": "cli",
}
# Sibling → the siblings it may import.
SIBLINGS = {
    "adapters": set(),
    "probe": set(),
    "merge": {"adapters"},
    **{s: {"adapters", "probe"} for s in ["select", "continual", "convert", "compress"]},
    **{s: {"adapters", "probe"} for s in ["decode", "analysis", "domains"]},
}
MAX_LINES = 450
MAX_MERGE_TOP = 5
MERGE_FOLDERS = ["engine", "recipe", "output", "methods", "transforms", "learned"]
IMPORT_SELF_BUDGET_S = 0.1

KNOWN_VIOLATIONS: set[str] = set()  # the old layout's are all fixed (issue #20)


# --- the import graph --------------------------------------------------------------------

PROBE = r"""
import importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
names = sys.stdin.read().split()

def in_child(work):
    # work() runs in a forked child; its JSON-able result comes back through a pipe.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        result = work()
        with os.fdopen(write, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = json.load(f)
    os.waitpid(pid, 0)
    return result

def import_all():
    # The third-party modules that importing every splice module loads.
    before = set(sys.modules)
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            pass
    return [m for m in sys.modules if m not in before and m.split(".")[0] != "splice"]

# Third-party code is loaded once here rather than in each of the ~340 children (half the
# test's time); the recorder below sees only splice modules, so the edges are unchanged.
for lib in ("torch", "numpy", "pydantic", "yaml", "typer", "rich", "safetensors", "transformers"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
for lib in in_child(import_all):
    try:
        importlib.import_module(lib)
    except BaseException:
        pass
assert not any(m == "splice" or m.startswith("splice.") for m in sys.modules)

class Recorder:
    # Records (importer, imported) for each splice module's first import.
    def __init__(self):
        self.edges = {}
    def find_spec(self, name, path=None, target=None):
        if name == "splice" or name.startswith("splice."):
            frame, importer = sys._getframe(1), None
            while frame is not None:
                mod = frame.f_globals.get("__name__", "")
                if mod == "splice" or mod.startswith("splice."):
                    importer = mod
                    break
                frame = frame.f_back
            self.edges.setdefault(name, importer)
        return None

def probe(name):
    def work():
        rec = Recorder()
        sys.meta_path.insert(0, rec)
        try:
            importlib.import_module(name)
            error = None
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
        return {"edges": rec.edges, "error": error}
    return work

for name in names:
    print(json.dumps({"root": name, **in_child(probe(name))}), flush=True)
"""


def modules() -> list[str]:
    """Every module under splice/, from the files on disk; ``__main__`` files run a program
    when imported, so only their import statements are checked (``static_imports``)."""
    names = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_graph() -> list[dict]:
    """Per module: {root, edges: {imported: importer or None}, error}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT)],
        input="\n".join(modules()), capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def stage(module: str, derived: dict[str, str]) -> str:
    return STAGE.get(top(module)) or derived.get(top(module), "foundation")


def allowed(a: str, b: str, derived: dict[str, str], sibs: dict[str, set[str]]) -> bool:
    ta, tb = top(a), top(b)
    if ta == tb:
        return True
    sa, sb = stage(a, derived), stage(b, derived)
    if sa == sb == "siblings":
        return tb in SIBLINGS.get(ta, sibs.get(ta, set()))
    return ORDER.index(sb) <= ORDER.index(sa)


def derive_unlisted(edges: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, set[str]]]:
    """An unlisted top-level module's stage: the latest stage it imports (foundation if none),
    from every (importer, imported) edge; in the sibling stage, it may import the siblings it
    imports."""
    derived, sibs = {}, {}
    for t in {top(a) for a, _ in edges} - set(STAGE):
        imported = {top(b) for a, b in edges if top(a) == t and top(b) != t}
        known = [STAGE[i] for i in imported if i in STAGE]
        derived[t] = max(known, key=ORDER.index) if known else "foundation"
        sibs[t] = {i for i in imported if STAGE.get(i) == "siblings"}
    return derived, sibs


def chain(edges: dict, module: str) -> list[str]:
    out = [module]
    while edges.get(out[-1]) and out[-1] not in out[:-1]:
        out.append(edges[out[-1]])
    return out[::-1]


def import_violations(graph: list[dict], derived: dict, sibs: dict) -> dict[str, str]:
    """{violation id: message with the import chain}."""
    found = {}
    for run in graph:
        if run["error"]:
            found[f"import-error: {run['root']}"] = f"import {run['root']} fails: {run['error']}"
        for imported, importer in run["edges"].items():
            if importer and not allowed(importer, imported, derived, sibs):
                vid = f"import: {importer} -> {imported}"
                sa, sb = stage(importer, derived), stage(imported, derived)
                kind = "a sibling not allowed" if sa == sb else "upward"
                path = " → ".join(chain(run["edges"], imported))
                found.setdefault(
                    vid,
                    f"{importer} imports {imported} ({top(importer) or 'splice'} → {top(imported)}"
                    f" is {kind}); chain when importing {run['root']}: {path}",
                )
    return found


def static_imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import statement under splice/, module level or
    inside a function (lazy imports count: they are dependencies too), except under
    ``if TYPE_CHECKING:``."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        pkg = parts[:-1]  # the package a relative import starts from
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
                targets = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                continue
            out += [(name, t, node.lineno) for t in targets if t.split(".")[0] == "splice"]
    return out


def check(found: dict[str, str], prefixes: tuple[str, ...]) -> None:
    known = {v for v in KNOWN_VIOLATIONS if v.startswith(prefixes)}
    new = {v: m for v, m in found.items() if v not in known}
    stale = known - set(found)
    lines = [f"NEW {v}: {m}" for v, m in sorted(new.items())]
    lines += [f"STALE (fixed: delete it from KNOWN_VIOLATIONS) {v}" for v in sorted(stale)]
    assert not lines, "\n".join(lines)


def test_no_upward_import():
    graph = import_graph()
    assert {run["root"] for run in graph} == set(modules())
    static = static_imports()
    runtime = [(a, b) for run in graph for b, a in run["edges"].items() if a]
    derived, sibs = derive_unlisted(runtime + [(a, b) for a, b, _ in static])
    found = import_violations(graph, derived, sibs)
    for importer, imported, line in static:
        if not allowed(importer, imported, derived, sibs):
            found.setdefault(
                f"import: {importer} -> {imported}",
                f"{importer} imports {imported} in a function, line {line} "
                f"({top(importer) or 'splice'} → {top(imported)} is not allowed)",
            )
    check(found, ("import", "import-error"))


# --- import time -------------------------------------------------------------------------


def import_self_time() -> float:
    """Seconds: the sum of ``-X importtime`` self times of the splice.* modules that ``import
    splice`` loads, in a fresh interpreter (startup and third-party modules not counted)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import splice"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    total = 0
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+\d+\s+\|\s+(\S+)", line.strip())
        if m and (m[2] == "splice" or m[2].startswith("splice.")):
            total += int(m[1])
    return total / 1e6


def test_import_splice_self_time():
    """Median over 5 runs (robust on a loaded 2-core box) of ``import_self_time``."""
    times = [import_self_time() for _ in range(5)]
    assert statistics.median(times) <= IMPORT_SELF_BUDGET_S, times


# --- structure ---------------------------------------------------------------------------


def structure_violations() -> dict[str, str]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            rel = path.relative_to(ROOT).as_posix()
            found[f"size: {rel}"] = f"{rel} has {n} lines (> {MAX_LINES}): split it by job"
    merge = PKG / "merge"
    top_files = sorted(p.name for p in merge.glob("*.py"))
    if len(top_files) > MAX_MERGE_TOP:
        found["layout: merge top level"] = (
            f"splice/merge/ has {len(top_files)} top-level .py files (> {MAX_MERGE_TOP}): "
            f"{top_files}"
        )
    for folder in MERGE_FOLDERS:
        if not (merge / folder / "__init__.py").is_file():
            found[f"layout: no splice/merge/{folder}/"] = f"splice/merge/{folder}/ is not a package"
    for pkg in ("deltas", "cli", "data"):
        if not (PKG / pkg / "__init__.py").is_file():
            found[f"layout: no splice/{pkg}/"] = f"splice/{pkg} is not a package"
    return found


def test_structure():
    check(structure_violations(), ("size", "layout"))
