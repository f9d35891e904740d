"""Multi-task data in ``splice train``: a ``task`` column, task ids and per-task evaluation.

Task names map to ids in sorted order (id i = ``names[i]``, written to metrics.json). A method
that routes by task (``Method.task_slots`` > 0: EPT) trains on batches of one task each and is
routed by that task's id before every forward (:class:`splice.train.batches.Batches`); other
methods keep mixed batches and ignore the column for training. Either way the evaluation is
reported per task too, each task's rows evaluated under its own id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from splice.errors import SpliceError
from splice.train.config import WHOLE, TrainConfig
from splice.train.data import Rows

__all__ = ["TaskRouting", "combine", "task_routing"]


@dataclass
class TaskRouting:
    """The tasks of a run: ``names`` (id i = names[i]) and ``route(model, id)`` when the
    method routes by task (None when it ignores tasks)."""

    names: list[str]
    route: Callable[[nn.Module, int], None] | None

    def ids(self, rows: Rows) -> list[int]:
        return [self.names.index(t) for t in rows.tasks]

    def groups(self, rows: Rows) -> dict[str, list[int]]:
        """Row indices of ``rows`` per task name, in id order (tasks without rows left out)."""
        out: dict[str, list[int]] = {name: [] for name in self.names}
        for i, task in enumerate(rows.tasks):
            out[task].append(i)
        return {name: idx for name, idx in out.items() if idx}


def _slots(cfg: TrainConfig) -> tuple[Any, int]:
    """The method object and its task slots (0 for methods without a task input)."""
    if cfg.method in WHOLE:
        return None, 0
    from splice.adapters import METHODS

    method = METHODS.get(cfg.method)()
    return method, method.task_slots(type(method).Config(**cfg.adapter))


def task_routing(cfg: TrainConfig, train: Rows, evaluation: Rows, world: int) -> TaskRouting | None:
    """The run's tasks, or None when the training data has no ``task`` column.

    Raises:
        SpliceError: the eval rows lack the column, more tasks than the method's slots, a
            PEFT export of several tasks, or (DDP) a task smaller than one global batch.
    """
    method, slots = _slots(cfg)
    if train.tasks is None or (evaluation.tasks is None and not slots):
        return None
    if evaluation.tasks is None:
        raise SpliceError(
            "the training data has a 'task' column and the eval data has none",
            where=cfg.eval_data, fix="add the task column to the eval file",
        )  # fmt: skip
    names = sorted(set(train.tasks) | set(evaluation.tasks))
    if not slots:
        return TaskRouting(names, None)
    if len(names) > slots:
        raise SpliceError(
            f"{len(names)} tasks in the data, {cfg.method} has {slots} task slots",
            where=cfg.data, fix=f"--set tasks={len(names)}",
        )  # fmt: skip
    if cfg.format == "peft" and len(names) > 1:
        raise SpliceError(
            f"a PEFT LoRA holds one ΔW; this {cfg.method} adapter has {len(names)} tasks",
            fix="use --format splice (set_task picks a task after loading)",
        )
    glob = cfg.batch_size * world
    small = [t for t in names if 0 < train.tasks.count(t) < glob]
    if world > 1 and small:
        raise SpliceError(
            f"task {small[0]!r} fills no global batch of {world}×{cfg.batch_size}",
            fix="lower --batch-size",
        )
    return TaskRouting(names, method.set_task)


def combine(results: list[dict[str, float]], objective: str) -> dict[str, float]:
    """The evaluation over all rows from per-task results (example- or token-weighted)."""
    key = "examples" if objective == "classification" else "tokens"
    count = sum(r[key] for r in results)
    loss = sum(r["loss"] * r[key] for r in results) / max(count, 1)
    if objective == "classification":
        correct = sum(r["accuracy"] * r[key] for r in results)
        return {"loss": loss, "accuracy": correct / max(count, 1), "examples": count}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
