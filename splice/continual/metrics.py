"""Continual-learning metrics over one accuracy matrix (docs/continual.md, "Metrics").

``R[i][j]`` is the accuracy on task ``j`` after training the ``i``-th task (0-based); entries
with ``j > i`` are ``None`` (a task is not evaluated before it is trained: its head does not
exist yet). With ``T`` tasks:

- average accuracy after task ``i``:  ``A_i = mean_{j ≤ i} R[i][j]``;
- backward transfer (Lopez-Paz & Ranzato, 2017):  ``BWT = mean_{j < T-1} (R[T-1][j] − R[j][j])``;
- forgetting (Chaudhry et al., 2018):  ``F = mean_{j < T-1} max_{j ≤ l < T-1} R[l][j] − R[T-1][j]``;
- forward transfer against independent training (Díaz-Rodríguez et al., 2018's "learning
  accuracy" form): ``FWT = mean_{j ≥ 1} (R[j][j] − ref_j)`` with ``ref_j`` the accuracy of a
  model trained on task ``j`` alone (one LoRA per task). GEM's ``R[j-1][j] − b_j`` needs a
  task evaluated before it is trained and is undefined with per-task heads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "check_matrix",
    "forgetting",
    "forward_transfer",
    "save_matrix",
    "summary",
]

Matrix = Sequence[Sequence[float | None]]


def check_matrix(R: Matrix) -> int:
    """The task count of a valid lower-triangular ``R``; raises ValueError otherwise."""
    T = len(R)
    for i, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"row {i} has {len(row)} entries, expected {T}")
        for j, v in enumerate(row):
            if (v is None) != (j > i):
                what = "missing" if v is None else "set above the diagonal"
                raise ValueError(f"R[{i}][{j}] is {what}")
    return T


def average_accuracy(R: Matrix) -> list[float]:
    """``A_i`` after every task ``i``."""
    T = check_matrix(R)
    return [sum(R[i][: i + 1]) / (i + 1) for i in range(T)]  # type: ignore[arg-type]


def backward_transfer(R: Matrix) -> float | None:
    """BWT (negative: forgetting); ``None`` for a single task."""
    T = check_matrix(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)  # type: ignore[operator]


def forgetting(R: Matrix) -> float | None:
    """Mean over earlier tasks of (best accuracy before the last task − final accuracy)."""
    T = check_matrix(R)
    if T < 2:
        return None
    drops = [max(R[lo][j] for lo in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)]
    return sum(drops) / (T - 1)  # type: ignore[arg-type]


def forward_transfer(R: Matrix, reference: Sequence[float] | None) -> float | None:
    """FWT against ``reference[j]`` (task ``j`` trained alone); ``None`` without one."""
    T = check_matrix(R)
    if reference is None or T < 2:
        return None
    if len(reference) != T:
        raise ValueError(f"reference has {len(reference)} entries for {T} tasks")
    return sum(R[j][j] - reference[j] for j in range(1, T)) / (T - 1)  # type: ignore[operator]


def summary(R: Matrix, reference: Sequence[float] | None = None) -> dict[str, Any]:
    """Every metric of ``R`` in one dict (the JSON's ``metrics``)."""
    avg = average_accuracy(R)
    return {
        "avg_accuracy": avg,
        "final_avg_accuracy": avg[-1],
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "fwt": forward_transfer(R, reference),
    }


def save_matrix(
    path: Path,
    tasks: Sequence[str],
    R: Matrix,
    *,
    method: str,
    stored: Mapping[str, Any] | None = None,
    reference: Sequence[float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``{"method", "tasks", "R", "metrics", "stored", ...}`` to ``path``; returns it."""
    if len(tasks) != check_matrix(R):
        raise ValueError(f"{len(tasks)} task names for a {len(R)}-task matrix")
    record = {
        "method": method,
        "tasks": list(tasks),
        "R": [list(row) for row in R],
        "metrics": summary(R, reference),
        "stored": dict(stored or {}),
        **dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return record
