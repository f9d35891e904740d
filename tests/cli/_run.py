"""Run ``splice …`` in-process as the console script would: exit code, stdout, stderr."""

from __future__ import annotations

import sys

import pytest


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str
) -> tuple[int, str, str]:
    from splice.cli import main

    monkeypatch.setattr(sys, "argv", ["splice", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
