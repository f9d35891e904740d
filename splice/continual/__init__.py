"""Continual adaptation: one backbone learns a sequence of tasks (docs/continual.md).

Methods, one file each, registered in :data:`CONTINUAL`: ``share`` (one evolving LoRA
subspace, spec peft.md §7), ``igsp`` (mixture of low-rank experts with subspace-constrained
growth, §17, [recon]), and the baselines ``sequential_lora`` and ``lora_per_task``.
:mod:`splice.continual.metrics` holds the accuracy-matrix metrics (average accuracy, BWT,
forgetting, forward transfer). Training them is :func:`splice.train.continual.run_sequence`'s
job (``splice continual``); this stage holds the pure pieces.
"""

from __future__ import annotations

from .base import CONTINUAL, ContinualMethod, Phase, Stored
from .metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    save_matrix,
    summary,
)

__all__ = [
    "CONTINUAL",
    "ContinualMethod",
    "Phase",
    "Stored",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "save_matrix",
    "summary",
]
