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


def test_train_help_names_every_adapter_method() -> None:
    """``--method``'s help lists the adapters by hand (the CLI must not import torch to start);
    this keeps that list equal to the registry."""
    import re
    import typing

    from splice.adapters import METHODS
    from splice.cli.train import train

    hints = typing.get_type_hints(train, include_extras=True)
    help_text = hints["method"].__metadata__[0].help
    listed = re.search(r"Adapter method \(([^)]*)\)", help_text)
    assert listed, help_text
    assert sorted(listed.group(1).split(", ")) == sorted(METHODS.names())
