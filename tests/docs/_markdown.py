"""The fenced code blocks of README.md and docs/*.md, with their doc-test marks.

A mark is an HTML comment (invisible when rendered) on the line(s) right before a fence:

    <!-- doc-test: skip — why this example cannot run here -->
    <!-- doc-test: skip-line "--device cuda" — why the lines containing this cannot run -->
    <!-- doc-test: fixture=NAME -->       Python objects the block uses (tests/docs/_fixtures.py)
    <!-- doc-test: file=recipe.yaml -->   this block is that file in every example of the page

Python (```python) and shell (```bash, ```sh, ```console: only its ``$ `` lines) blocks run;
other blocks (no tag, ```text, ```yaml, ...) are shown, not run. See CONTRIBUTING.md.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
# A reason is text after an em dash (or a colon): at least two words.
REASON = r"\s*(?:—|:)\s*(?P<reason>\S+\s+\S.*)"
DIRECTIVES = {
    "skip": re.compile(r"^skip" + REASON + "$"),
    "skip-line": re.compile(r'^skip-line\s+"(?P<pattern>[^"]+)"' + REASON + "$"),
    "fixture": re.compile(r"^fixture=(?P<name>[\w-]+)$"),
    "file": re.compile(r"^file=(?P<name>[\w./-]+)$"),
}
# Commands that need the environment itself (CI runs them); they need a skip mark.
NEEDS_MARK = re.compile(r"^(\./run\.sh|pip3? install|python3? -m pip|\S*/pip3? install)\b")
# An untagged block that starts like a command must say what it is (```bash or ```text).
LOOKS_LIKE_A_COMMAND = re.compile(r"^(\$ |splice |\./run\.sh|\S*python3? |pip install)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    heading: str  # slug of the nearest heading above
    lang: str
    code: str
    marks: list[str] = field(default_factory=list)  # raw directive texts
    id: str = ""  # file#heading-N, N counting runnable blocks under that heading

    @property
    def runnable(self) -> bool:
        return self.lang in PYTHON | SHELL

    def directives(self) -> tuple[dict, list[str]]:
        """(parsed directives, errors): skip (reason), skip-line [(pattern, reason)], fixture,
        files [names]."""
        found: dict = {"skip": None, "skip-line": [], "fixture": None, "file": []}
        errors = []
        for text in self.marks:
            kind = re.match(r"^[\w-]+", text)
            rx = DIRECTIVES.get(kind.group(0) if kind else "")
            m = rx.match(text) if rx else None
            where = f"{self.file}:{self.line - 1}"
            if rx is None:
                errors.append(f"{where}: unknown doc-test mark {text!r} (know {list(DIRECTIVES)})")
            elif m is None:
                errors.append(
                    f"{where}: malformed mark {text!r}: a skip needs a reason after an em dash "
                    f'(`skip — needs a GPU`, `skip-line "--device cuda" — needs a GPU`)'
                )
            elif rx is DIRECTIVES["skip"]:
                found["skip"] = m["reason"]
            elif rx is DIRECTIVES["skip-line"]:
                found["skip-line"].append((m["pattern"], m["reason"]))
            elif rx is DIRECTIVES["fixture"]:
                found["fixture"] = m["name"]
            else:
                found["file"].append(m["name"])
        return found, errors


def blocks(path: Path) -> list[Block]:
    """Every fenced block of one Markdown file, with the marks right above it."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    heading, counts, i = "", {}, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = slug(line.lstrip("#"))
        m = FENCE.match(line)
        if m:
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            marks, j = [], i - 1
            while j >= 0 and MARK.match(lines[j]):
                marks.insert(0, MARK.match(lines[j]).group(1))
                j -= 1
            block = Block(rel, i + 1, heading, m.group(1).lower(), "\n".join(lines[i + 1 : end]))
            block.marks = marks
            if block.runnable:
                counts[heading] = counts.get(heading, 0) + 1
                block.id = f"{rel}#{heading}-{counts[heading]}"
            out.append(block)
            i = end
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in blocks(path)]


def shell_commands(block: Block) -> list[str]:
    """The command lines of a shell block: continuations joined, comments and blank lines
    and (for ```console) output lines dropped."""
    raw = block.code.splitlines()
    if block.lang == "console":
        raw = [line[2:] for line in raw if line.startswith("$ ")]
    commands, pending = [], ""
    for line in raw:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if shlex.split(text, comments=True):
            commands.append(text)
    return commands
