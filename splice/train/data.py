"""Training data: a local CSV/JSONL file with ``text`` (and ``label``, ``task``) columns, or a
bench task."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import SpliceError

__all__ = ["Rows", "load_splits"]


@dataclass
class Rows:
    texts: list[str]
    labels: list[Any] | None
    tasks: list[str] | None = None  # the task of each row (multi-task data), or None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> Rows:
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        tasks = None if self.tasks is None else [self.tasks[i] for i in idx]
        return Rows([self.texts[i] for i in idx], labels, tasks)

    @classmethod
    def from_records(cls, records: list[Any], where: str) -> Rows:
        """Rows from dicts with ``text``/``label``/``task`` keys or ``(text, label)`` pairs."""
        texts, labels, tasks = [], [], []
        for i, rec in enumerate(records):
            text, label = (rec.get("text"), rec.get("label")) if isinstance(rec, dict) else rec
            if not isinstance(text, str) or not text.strip():
                raise SpliceError(
                    f"row {i + 1} has no text", where=where, fix="fill the text column"
                )
            texts.append(text)
            labels.append(label)
            tasks.append(rec.get("task") if isinstance(rec, dict) else None)
        if not texts:
            raise SpliceError("no rows", where=where, fix="the file needs a header and rows")
        return cls(texts, _all_or_none(labels, "label", where), _all_or_none(tasks, "task", where))


def _all_or_none(values: list[Any], column: str, where: str) -> list[Any] | None:
    """``values`` if every row has one, None if no row has; a partly filled column is an error."""
    has = [v is not None and v != "" for v in values]
    if any(has) and not all(has):
        raise SpliceError(
            f"row {has.index(False) + 1} has no {column}", where=where,
            fix=f"fill the {column} column in every row, or drop it",
        )  # fmt: skip
    if column == "task" and all(has):
        return [str(v) for v in values]
    return values if all(has) else None


def read_file(path: Path) -> Rows:
    """Rows of a ``.csv`` (header with ``text``[, ``label``]) or ``.jsonl`` file."""
    if not path.is_file():
        raise SpliceError("data file not found", where=str(path), fix="check the path")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "text" not in (reader.fieldnames or []):
                raise SpliceError(
                    "CSV has no 'text' column", where=str(path), fix="add a header row"
                )
            records = list(reader)
    elif path.suffix.lower() in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SpliceError(f"line {n}: {e.msg}", where=str(path)) from None
    else:
        raise SpliceError("unknown data file type", where=str(path), fix="use .csv or .jsonl")
    return Rows.from_records(records, str(path))


def _bench_task(name: str, seed: int, split: str = "test") -> tuple[Rows, Rows]:
    """Train and ``split`` (test or val) rows of a text task of ``splice bench`` (its seeded
    stratified splits, disjoint)."""
    from splice.data.registry import TASKS, load_task

    task = TASKS.get(name)
    if task.modality != "text":
        raise SpliceError(
            f"bench task {name!r} is {task.modality}, not text", fix="pick a text task"
        )
    data = load_task(task, seed=seed)

    def rows(split) -> Rows:
        return Rows([str(t) for t in split.x], [data.classes[int(y)] for y in split.y])

    return rows(data.train), rows(getattr(data, split))


def load_splits(
    data: str, eval_data: str | None, eval_fraction: float, seed: int, eval_split: str = "test"
) -> tuple[Rows, Rows]:
    """(train, eval) rows of a file or bench task; a file without ``eval_data`` gives up a
    seeded ``eval_fraction`` for evaluation, a bench task evaluates on its ``eval_split``."""
    path = Path(data)
    if path.suffix.lower() in (".csv", ".jsonl", ".json") or path.exists():
        if eval_split != "test":
            raise SpliceError(
                f"--eval-split {eval_split} needs a bench task", where=data,
                fix="for a file, pass --eval-data or --eval-fraction",
            )  # fmt: skip
        rows = read_file(path)
        if eval_data is not None:
            return rows, read_file(Path(eval_data))
        n_eval = max(1, round(eval_fraction * len(rows)))
        if n_eval >= len(rows):
            raise SpliceError(f"{len(rows)} rows leave nothing to train on", where=data)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        return rows.subset(sorted(perm[n_eval:])), rows.subset(sorted(perm[:n_eval]))
    train, held_out = _bench_task(data, seed, eval_split)
    return train, read_file(Path(eval_data)) if eval_data else held_out
