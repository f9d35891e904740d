"""Per-task configuration of the paper protocol: each task's fine-tune and learned schedules.

The merging papers fine-tune every task on its own (all weights, its own schedule, its own
head) and merge the results (fusionbench.md §3: "FB protocol"). The paper profile gives one
default :class:`~splice.bench.finetune.FinetuneConfig`; ``--set TASK.KEY=VALUE`` changes one
task's fine-tune (``steps``, ``lr``, ``batch_size``, ...), validated like the profile's own.
Learned merges run on a schedule per method: ``"paper"`` (the method's defaults, the
paper's step counts), ``"short"`` (the method's short schedule, as ``splice bench``'s quick
profile) or explicit overrides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from splice.bench.finetune import FinetuneConfig

__all__ = ["schedule_params", "task_configs"]


def task_configs(
    tasks: Sequence[str],
    default: FinetuneConfig,
    overrides: Mapping[str, Mapping[str, Any]],
) -> dict[str, FinetuneConfig]:
    """``{task: FinetuneConfig}``: ``default`` with each task's ``overrides`` applied.

    Raises:
        SpliceError: an override for a task not in ``tasks`` (UsageError), or a key or value
            that FinetuneConfig refuses.
    """
    from splice._schema import validate
    from splice.errors import UsageError

    unknown = sorted(set(overrides) - set(tasks))
    if unknown:
        raise UsageError(
            f"per-task settings for task(s) not in this run: {unknown}",
            fix=f"use one of {list(tasks)} before the dot (TASK.KEY=VALUE)",
        )
    out = {}
    for t in tasks:
        values = {**default.model_dump(), **dict(overrides.get(t, {}))}
        fields = sorted(FinetuneConfig.model_fields)
        out[t] = validate(FinetuneConfig, values, prefix=f"{t}: ", fix=f"valid keys: {fields}")
    return out


def schedule_params(method: str, schedule: str | Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of learned method ``method`` under ``schedule``: ``"paper"`` pins
    every key of the method's short schedule to its default (the paper's), ``"short"`` is the
    short schedule, a mapping is overrides on top of the defaults."""
    from splice.errors import UsageError
    from splice.merge.learned import learned

    entry = learned.get(method)
    if schedule == "short":
        return dict(entry.short)
    if schedule == "paper":
        fields = entry.Params.model_fields
        return {k: fields[k].default for k in entry.short}
    if isinstance(schedule, Mapping):
        return dict(schedule)
    raise UsageError(f"schedule {schedule!r} of {method}", fix="use 'paper', 'short' or a mapping")
