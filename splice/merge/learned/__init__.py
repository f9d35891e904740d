"""Data-driven and continual merging: AdaMerging, aTLAS, Concrete subspace, LOT, OPCM.

Each method is one file here and registers itself in :data:`learned`; every one works on a
base ``nn.Module``, per-task deltas ``{task: {tensor name: ΔW}}`` and, where it needs them,
per-task examples, through ``torch.func.functional_call`` (docs/merging-learned.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from splice.merge.learned._base import ContinualStep, LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Samples

_LAZY = {
    "adamerging": "splice.merge.learned.adamerging",
    "atlas": "splice.merge.learned.atlas",
    "concrete": "splice.merge.learned.concrete",
    "lot": "splice.merge.learned.lot",
    "opcm": "splice.merge.learned.opcm",
    "continual_task_arithmetic": "splice.merge.learned.continual_task_arithmetic",
}

__all__ = ["ContinualStep", "LearnedMerge", "LearnedMethod", "Samples", "learned", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splice.merge.learned' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
