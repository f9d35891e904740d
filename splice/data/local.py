"""User tasks from local files: a CSV/JSONL of ``text,label`` rows, or an image folder with
one sub-folder per class. They plug into the benchmark exactly like the built-in tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from splice.data.cache import file_sha256, stable_hash
from splice.data.registry import TASKS, Task
from splice.errors import SpliceError

__all__ = ["local_task", "resolve_task"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_SIZE = 64  # folder images are resized to this square size when read


def resolve_task(spec: str) -> Task:
    """A registered task name, or a path to a CSV/JSONL file or an image folder."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".csv", ".jsonl") or path.is_dir():
        return local_task(path)
    return TASKS.get(spec)


def _text_rows(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".csv":
                rows = [(r.get("text"), r.get("label")) for r in csv.DictReader(f)]
            else:
                rows = [
                    (obj.get("text"), obj.get("label"))
                    for obj in (json.loads(line) for line in f if line.strip())
                ]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpliceError(f"cannot parse: {e}", where=str(path)) from None
    if not rows or any(t is None or lab is None for t, lab in rows):
        raise SpliceError(
            "every row needs 'text' and 'label' fields", where=str(path), fix="add both columns"
        )
    return [(str(t), str(lab)) for t, lab in rows]


def _images(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from PIL import Image

    classes = tuple(sorted(d.name for d in path.iterdir() if d.is_dir()))
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))))
                ys.append(label)
    if len(classes) < 2 or not xs:
        raise SpliceError(
            "an image task needs at least two class sub-folders with images",
            where=str(path),
            fix="lay it out as DIR/<class>/<image>.png",
        )
    return np.stack(xs), np.array(ys, dtype=np.int64), classes


def local_task(path: Path) -> Task:
    """A :class:`Task` read from ``path``; its cache key is a hash of the file contents."""
    if not path.exists():
        raise SpliceError("task file or folder not found", where=str(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        key = stable_hash({str(p.relative_to(path)): file_sha256(p) for p in files})
        return Task(path.name, "image", lambda: _images(path), key, f"image folder {path}")

    def read() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
        rows = _text_rows(path)
        classes = tuple(sorted({lab for _, lab in rows}))
        return [t for t, _ in rows], np.array([classes.index(lab) for _, lab in rows]), classes

    return Task(path.stem, "text", read, file_sha256(path), f"local file {path}")
