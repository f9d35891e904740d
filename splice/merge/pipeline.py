"""Running and planning multi-document recipes (:mod:`splice.merge.recipe.multi`).

:func:`merge_pipeline` runs the stages in DAG order, each once; with ``lazy`` a stage whose
output dir already holds a finished splice merge of the *same* recipe (its ledger's recipe,
references rewritten) is reused, not rerun. :func:`plan_pipeline` preflights and plans every
stage before anything runs: a stage that reads an intermediate not built yet is checked
against that intermediate's plan (its tensor names, shapes, dtypes and config), so a typo in
the last stage fails before the first one spends an hour.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.errors import SpliceError
from splice.merge.engine import MergeOptions
from splice.merge.recipe import recipe_from_raw
from splice.merge.recipe.multi import Stage, read_stages

__all__ = ["PlannedCheckpoint", "finished", "merge_pipeline", "plan_pipeline"]

LEDGER = "splice-ledger.json"


def finished(stage: Stage) -> bool:
    """``stage.out`` holds a finished splice merge of exactly this stage's recipe."""
    assert stage.out is not None
    ledger = stage.out / LEDGER
    if not ledger.is_file():
        return False
    try:
        recorded = json.loads(ledger.read_text()).get("recipe")
    except (OSError, ValueError):
        return False
    same = json.dumps(recorded, sort_keys=True, default=str)
    return same == json.dumps(stage.raw, sort_keys=True, default=str)


def _split(options: Mapping[str, Any]) -> tuple[Path | None, bool, dict[str, Any]]:
    rest = dict(options)
    inter = rest.pop("intermediates", None)
    lazy = bool(rest.pop("lazy", False))
    return (Path(inter) if inter is not None else None), lazy, rest


def merge_pipeline(path: str | Path, out: str | Path | None, **options: Any) -> dict[str, Any]:
    """Run every stage of the multi-document recipe ``path``; return what ran and what was
    reused: ``{"ran": [...], "reused": [...], "out": final output or None}``.

    ``options``: :class:`~splice.merge.engine.job.MergeOptions` fields, ``intermediates`` (the
    dir of named stages' outputs) and ``lazy``. Everything is checked before the first stage
    runs (:func:`plan_pipeline` without the memory budget).
    """
    from splice.merge.api import merge

    inter, lazy, rest = _split(options)
    stages = read_stages(path, inter, Path(out) if out is not None else None)
    _plan(stages, path, lazy, {k: v for k, v in rest.items() if k in _PLAN_KEYS})
    ran, reused = [], []
    for stage in stages:
        assert stage.out is not None
        label = stage.name or str(stage.out)
        if lazy and finished(stage):
            reused.append(label)
            continue
        recipe = recipe_from_raw(stage.raw, str(path), stage.where)
        own = stage.name is not None and (stage.out / LEDGER).is_file()
        force = bool(rest.get("force")) or own
        merge(recipe, stage.out, **{**rest, "force": force})
        ran.append(label)
    final = next((s.out for s in stages if s.name is None), None)
    return {"ran": ran, "reused": reused, "out": str(final) if final else None}


_PLAN_KEYS = {f for f in MergeOptions.__dataclass_fields__} - {"progress", "checksums", "force"}


def plan_pipeline(path: str | Path, out: str | Path | None = None, **options: Any) -> dict:
    """Preflight and memory plan of every stage, from headers (intermediates not built yet:
    from their own plan). Returns ``{"stages": [{"name", "out", "reused", "plan"}, …],
    "peak_ram": the largest stage's}``."""
    inter, lazy, rest = _split(options)
    stages = read_stages(path, inter, Path(out) if out is not None else Path("OUT"))
    return _plan(stages, path, lazy, {k: v for k, v in rest.items() if k in _PLAN_KEYS})


def _plan(stages: list[Stage], path: str | Path, lazy: bool, opts: dict[str, Any]) -> dict:
    from splice.merge.api import plan_merge

    reports = []
    with _planned_inputs() as planned:
        for stage in stages:
            assert stage.out is not None
            reuse = lazy and finished(stage)
            entry: dict[str, Any] = {"name": stage.name, "out": str(stage.out), "reused": reuse}
            if not reuse:
                recipe = recipe_from_raw(stage.raw, str(path), stage.where)
                report = plan_merge(recipe, **opts, _keep=True)
                kept = report.pop("_kept", None)
                if kept is not None:
                    planned[str(stage.out)] = kept
                entry["plan"] = report
            reports.append(entry)
    peaks = [r["plan"]["plan"]["peak_ram"] for r in reports if "plan" in r]
    return {"stages": reports, "peak_ram": max(peaks, default=0)}


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype_name: str


class PlannedCheckpoint(Mapping[str, Any]):
    """An intermediate that is planned but not written: names, shapes, dtypes, config.
    Preflight and the memory plan read only headers, so they can check a later stage
    against it; reading a tensor is an error."""

    format = "planned"

    def __init__(self, path: str, layout: dict[str, _Info], config: dict | None) -> None:
        self.metadata: dict[str, str] = {}
        self.files: list[Path] = []
        self.path = Path(path)
        self.dir = None
        self._layout = layout
        self.config = config

    @classmethod
    def of(cls, path: str, tasks: list[Any], config: dict | None, out_dtype: str | None):
        layout = {
            t.name: _Info(t.shape, (out_dtype or t.dtype_name) if t.merge else t.dtype_name)
            for t in tasks
        }
        return cls(path, layout, config)

    def info(self, name: str) -> _Info:
        return self._layout[name]

    def __getitem__(self, name: str) -> Any:
        raise SpliceError("an intermediate that is only planned has no tensors", where=name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)

    def __contains__(self, name: object) -> bool:
        return name in self._layout

    def check_unchanged(self) -> None:
        """Nothing on disk to change."""


_PLANNED: dict[str, PlannedCheckpoint] | None = None


@contextmanager
def _planned_inputs() -> Iterator[dict[str, PlannedCheckpoint]]:
    global _PLANNED
    previous, _PLANNED = _PLANNED, {}
    try:
        yield _PLANNED
    finally:
        _PLANNED = previous


def planned_input(path: str) -> PlannedCheckpoint | None:
    """The planned intermediate at ``path`` while a pipeline is being planned, else None."""
    if _PLANNED is None:
        return None
    return _PLANNED.get(str(Path(path)))
