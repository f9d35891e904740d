"""Every Python and shell example in README.md and docs/*.md runs (issue #20, deliverable 4).

Blocks are extracted from the Markdown (tests/docs/_markdown.py); each runs in a fresh copy of
a working directory holding the files examples name (``./base``, ``./math``, ``MODEL_DIR``,
``data.csv``, ... from tests/docs/_fixtures.py) plus the page's ``file=`` blocks (e.g. its
recipe.yaml). A Python block must not raise; every shell command line must exit 0, each line
in its own fresh copy (the lines of a block are alternatives, not a script). ``splice ...``
lines run the console script's entry point (``splice.cli:main``) in a process forked from a
server that imported torch once (tests/docs/_server.py); other lines run in bash with the
venv's bin/ first on PATH. A block that cannot run carries a reasoned skip mark in the
Markdown; the markup is checked by ``test_doc_test_marks``. CONTRIBUTING.md documents it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs._fixtures import NAMESPACES, build_workdir
from tests.docs._markdown import (
    LOOKS_LIKE_A_COMMAND,
    NEEDS_MARK,
    PYTHON,
    ROOT,
    all_blocks,
    shell_commands,
)

# Examples that fail on this branch because of the code, not the docs: {block id: (why,
# a string their error output contains)}. Each must still fail with that string: once the
# code is fixed the test fails until its entry is removed, so the list cannot go stale.
KNOWN_BROKEN: dict[str, tuple[str, str]] = {}  # block id: (why, expected error text)

BLOCKS = all_blocks()
RUNS = [b for b in BLOCKS if b.runnable and not b.directives()[0]["skip"]]
SHELL_META = re.compile(r"[|&;<>()$`*?\[\]~]")


def test_doc_test_marks():
    """Marks parse, skips give reasons, fixtures exist, nothing that cannot run goes unmarked,
    commands are not hidden in untagged blocks, every Python block compiles (skipped ones
    too), and KNOWN_BROKEN names blocks that run."""
    errors = []
    for b in BLOCKS:
        found, errs = b.directives()
        errors += errs
        where = f"{b.file}:{b.line}"
        if found["fixture"] and found["fixture"] not in NAMESPACES:
            errors.append(
                f"{where}: unknown fixture {found['fixture']!r} (have {list(NAMESPACES)})"
            )
        if (found["skip"] or found["skip-line"] or found["fixture"]) and not b.runnable:
            errors.append(f"{where}: a skip/fixture mark on a ```{b.lang} block, which never runs")
        if found["file"] and b.runnable:
            errors.append(f"{where}: file= marks data blocks (yaml, json, csv), not code")
        if not b.lang and LOOKS_LIKE_A_COMMAND.match(b.code):
            errors.append(
                f"{where}: an untagged block that starts with a command: tag it ```bash (with a "
                "skip mark if it cannot run), or ```text if it shows output"
            )
        if b.lang in PYTHON:
            try:
                compile(b.code, b.id, "exec")
            except SyntaxError as e:
                errors.append(f"{where}: does not compile: {e}")
        if b.runnable and b.lang not in PYTHON:
            commands = shell_commands(b)
            for pattern, _ in found["skip-line"]:
                if not any(pattern in c for c in commands):
                    errors.append(f"{where}: skip-line {pattern!r} matches no command (stale)")
            if not found["skip"]:
                for c in commands:
                    if NEEDS_MARK.match(c) and not any(p in c for p, _ in found["skip-line"]):
                        errors.append(f"{where}: {c!r} cannot run in a test: give it a skip mark")
    ids = {b.id for b in RUNS}
    errors += [
        f"KNOWN_BROKEN names {k!r}, which is not a block that runs"
        for k in KNOWN_BROKEN
        if k not in ids
    ]
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("docs") / "workdir")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**os.environ, "SPLICE_CACHE": str(tmp_path_factory.mktemp("splice-cache"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = Path(__file__).with_name("_server.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ROOT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert json.loads(proc.stdout.readline()) == {"ready": True}

    def call(request: dict) -> int:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())["rc"]

    call.env = env
    yield call
    proc.stdin.close()
    proc.wait(timeout=30)


def _workdir(template: Path, tmp_path: Path, n: int, page_files: dict[str, str]) -> Path:
    cwd = tmp_path / f"run{n}"
    shutil.copytree(template, cwd)
    for name, text in page_files.items():
        (cwd / name).write_text(text + "\n")
    return cwd


def _run(block, server, template, tmp_path) -> list[str]:
    """Run one block; return the failures (command or block, exit status, output)."""
    page_files = {
        name: b.code for b in BLOCKS if b.file == block.file for name in b.directives()[0]["file"]
    }
    found = block.directives()[0]
    failures = []
    if block.lang in PYTHON:
        cwd, log = _workdir(template, tmp_path, 0, page_files), tmp_path / "python.log"
        request = {"python": block.code, "name": block.id, "fixture": found["fixture"]}
        rc = server({**request, "cwd": str(cwd), "log": str(log)})
        if rc:
            failures.append(f"python block exited {rc}:\n{log.read_text()}")
        return failures
    for n, command in enumerate(shell_commands(block)):
        if any(pattern in command for pattern, _ in found["skip-line"]):
            continue
        cwd, log = _workdir(template, tmp_path, n, page_files), tmp_path / f"cmd{n}.log"
        argv = shlex.split(command, comments=True)
        if argv[0] == "splice" and not SHELL_META.search(" ".join(argv)):
            rc = server({"cli": argv[1:], "cwd": str(cwd), "log": str(log)})
        else:
            env = {
                **server.env,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            }
            with log.open("w") as out:
                done = subprocess.run(
                    ["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=out
                )
                rc = done.returncode
        if rc:
            failures.append(f"$ {command}\nexited {rc}:\n{log.read_text()}")
    return failures


@pytest.mark.parametrize("block", RUNS, ids=[b.id for b in RUNS])
def test_example_runs(block, server, template, tmp_path):
    failures = _run(block, server, template, tmp_path)
    where = f"{block.file}:{block.line} ({block.id})"
    if block.id in KNOWN_BROKEN:
        why, expected = KNOWN_BROKEN[block.id]
        assert failures, f"{where} runs now: remove it from KNOWN_BROKEN ({why})"
        assert any(expected in f for f in failures), (
            f"{where} is KNOWN_BROKEN for {expected!r} but fails otherwise:\n" + "\n".join(failures)
        )
        return
    assert not failures, f"{where}:\n" + "\n\n".join(failures)
