"""The rows of a benchmark run, written as they finish, so an interrupted run resumes.

A long profile (``--full``, ``--protocol paper``) runs for hours; fine-tunes are cached by
:mod:`splice.bench.finetune`, and every evaluated row lands here, one JSON line each, flushed
to disk before the next row starts. ``splice bench ... --resume`` rereads the journal in
``--out`` and evaluates only the rows it lacks. The journal's first line is the run's settings
(the profile's config): a resume with other settings is refused, naming them, since its rows
would not belong to the same table. Code changed between the interruption and the resume is
not detected (as with ``splice train --resume``): resume only the run you stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL", "Journal"]

JOURNAL = "journal.jsonl"


class Journal:
    """Finished rows by phase key (``evaluate/<modality>/<seed>/<row>``, as in the plan).

    ``path=None`` keeps nothing (library use). Without ``resume`` an existing journal is
    started over; with it, its rows are reused when its settings equal ``settings``."""

    def __init__(
        self, path: Path | None, settings: Mapping[str, Any], resume: bool = False
    ) -> None:
        self.path = path
        self.rows: dict[str, Any] = {}
        self.reused = 0
        head = json.loads(json.dumps({"settings": settings}, default=str))
        if path is None:
            return
        if resume and path.is_file():
            text = path.read_text()
            if not text.endswith("\n"):  # drop the line being written when the run stopped,
                text = text[: text.rfind("\n") + 1]  # so the next row starts on its own line
                path.write_text(text)
            lines = text.splitlines()
            first = json.loads(lines[0]) if lines else {}
            if first.get("settings") != head["settings"]:
                _refuse(path, first.get("settings") or {}, head["settings"])
            for n, line in enumerate(lines[1:], 2):
                try:
                    entry = json.loads(line)
                    self.rows[entry["key"]] = entry["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    from splice.errors import SpliceError

                    raise SpliceError(
                        f"--resume: line {n} of {path} is not a journal row",
                        fix="rerun without --resume to start over",
                    ) from None
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(head) + "\n")

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> Any | None:
        """The stored value of a finished row (counted as reused), or None."""
        if key not in self.rows:
            return None
        self.reused += 1
        return self.rows[key]

    def row(self, key: str, compute: Callable[[], Any]) -> Any:
        """The stored value of ``key``, else ``compute()``, recorded before it is returned."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        """Record a finished row; on disk before this returns."""
        self.rows[key] = value
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _refuse(path: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    from splice.errors import UsageError

    changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    raise UsageError(
        f"--resume: {path} holds a run with different settings: {changed}",
        fix="rerun with the original options, or without --resume to start over",
    )
