"""Per-task merge statistics (RegMean Grams, Fisher diagonals): one streaming pass, one file.

A statistics file is a safetensors file beside the task's deltas, one per task and kind
(``<dir>/<task>.<kind>.safetensors``). Its metadata names what the numbers belong to, so a file
from another base model, another expert or another set of tensors is refused in one line
instead of merging silently wrong:

- ``format``: ``splice-merge-stats/1``; ``kind``: ``gram`` (RegMean) or ``fisher``;
- ``base``: a fingerprint of the base tensors the deltas apply to (names, shapes, dtypes and
  a strided sample of their values);
- ``expert``: the same fingerprint of the task's delta tensors;
- ``tensors``: a hash of the sorted keys stored (layer keys for Grams, tensor names for
  Fisher), so a file made for another tensor set is refused;
- ``samples``: the examples the pass saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.merge.learned._data import Samples, as_samples

__all__ = [
    "FORMAT",
    "TaskStats",
    "fingerprint",
    "load_stats",
    "save_stats",
    "stats_path",
    "task_statistics",
]

FORMAT = "splice-merge-stats/1"
_PROBES = 64  # values sampled per tensor for the fingerprint


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """A short hash of names, shapes, dtypes and a strided sample of each tensor's values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // _PROBES)
        sample = flat[::step][:_PROBES].to("cpu", torch.float64).numpy()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.round(6).tobytes())
    return h.hexdigest()[:16]


def _keys_hash(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


@dataclass
class TaskStats:
    """One task's statistics: ``values[key]`` (float64 on CPU), ``rows[key]`` counted rows."""

    kind: str
    task: str
    base: str
    expert: str
    samples: int
    values: dict[str, Tensor]
    rows: dict[str, int]
    keys: tuple[str, ...] = ()
    """The tensor set the statistics were collected for (default: the keys of ``values``;
    a layer that never ran has no value but is part of the set)."""


def stats_path(directory: str | Path, task: str, kind: str) -> Path:
    """Where a task's statistics of ``kind`` live in ``directory``."""
    return Path(directory) / f"{task}.{kind}.safetensors"


def save_stats(path: str | Path, stats: TaskStats) -> Path:
    """Write ``stats`` (atomically: a temp file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "kind": stats.kind,
        "task": stats.task,
        "base": stats.base,
        "expert": stats.expert,
        "tensors": _keys_hash(stats.keys or stats.values),
        "samples": str(stats.samples),
        "rows": json.dumps(stats.rows, sort_keys=True),
    }
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in stats.values.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _same(path: Path, what: str, stored: str | None, here: str, again: str) -> None:
    if stored != here:
        raise SpliceError(
            f"statistics were collected for {what} ({stored}; here: {here})",
            where=str(path),
            fix=f"collect them again {again} (delete the file)",
        )


def task_statistics(
    kind: str,
    method: str,
    directory: str | None,
    task: str,
    ids: tuple[str, str],
    keys: Iterable[str],
    data: Mapping[str, Any] | None,
    compute: Callable[[Samples], tuple[dict[str, Tensor], dict[str, int], int]],
) -> tuple[dict[str, Tensor], dict[str, int], bool]:
    """A task's statistics: read from ``directory`` if its file exists, else ``compute``d
    from ``data[task]`` (returning values, rows per key and examples seen) and written there
    when ``directory`` is set. ``ids`` are the (base, expert) fingerprints. Returns
    ``(values, rows, loaded)``.

    Raises:
        SpliceError: neither a file nor data for the task, or a file that does not belong.
    """
    keys = tuple(keys)
    path = stats_path(directory, task, kind) if directory else None
    if path is not None and path.exists():
        got = load_stats(path, kind=kind, base=ids[0], expert=ids[1], keys=keys)
        return got.values, got.rows, True
    if data is None or task not in data:
        raise SpliceError(
            f"{method}: no data and no statistics file for task {task!r}",
            fix=f"pass data={{task: inputs}} or stats=<dir with {task}.{kind}.safetensors>",
        )
    values, rows, count = compute(as_samples(data[task], task))
    if path is not None:
        cpu = {k: v.cpu() for k, v in values.items()}
        save_stats(path, TaskStats(kind, task, ids[0], ids[1], count, cpu, rows, keys))
    return values, rows, False


def load_stats(
    path: str | Path, *, kind: str, base: str, expert: str, keys: Iterable[str]
) -> TaskStats:
    """Read a statistics file and check it belongs to this base, expert and tensor set.

    Raises:
        SpliceError: not a splice statistics file, another kind, another base model, another
            expert, or another set of tensors (one line naming the file).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SpliceError("statistics file does not exist", where=str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        values = {k: f.get_tensor(k).double() for k in f.keys()}  # noqa: SIM118
    if meta.get("format") != FORMAT:
        got = meta.get("format")
        raise SpliceError(f"not a splice statistics file (format {got!r})", where=str(path))
    if meta.get("kind") != kind:
        raise SpliceError(f"statistics of kind {meta.get('kind')!r}, not {kind!r}", where=str(path))
    _same(path, "another base model", meta.get("base"), base, "on this base")
    want = sorted(keys)
    if meta.get("tensors") != _keys_hash(want) or not set(values) <= set(want):
        raise SpliceError(
            f"statistics cover another set of tensors than the {len(want)} needed",
            where=str(path),
            fix="collect them again for this tensor set (delete the file)",
        )
    _same(path, "other task deltas", meta.get("expert"), expert, "for these deltas")
    rows = {k: int(v) for k, v in json.loads(meta.get("rows", "{}")).items()}
    task, samples = meta.get("task", ""), int(meta.get("samples", 0))
    return TaskStats(kind, task, base, expert, samples, values, rows, tuple(want))
