"""The app itself: every command registered, ``python -m splice.cli``, a light ``--help``."""

from __future__ import annotations

import os
import subprocess
import sys


def test_python_m_runs_the_app_with_every_command_in_order() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "splice.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("│ ")]
    commands = [w for w in lines if w in ("inspect", "bench", "train", "merge")]
    assert commands == ["inspect", "bench", "train", "merge"]


def test_the_app_imports_no_heavy_dependency() -> None:
    code = (
        "import sys, splice.cli\n"
        "heavy = [m for m in ('torch', 'rich', 'pydantic', 'splice.io', 'splice.merge')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
