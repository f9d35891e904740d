"""Data-driven and continual merging: AdaMerging, aTLAS, Concrete subspace, Fisher merging,
LOT, OPCM, RegMean, RegMean++.

Each method is one file here and registers itself in :data:`learned`; every one works on a
base ``nn.Module``, per-task deltas ``{task: {tensor name: ΔW}}`` and, where it needs them,
per-task examples, through ``torch.func.functional_call`` (docs/merging-learned.md).

Each method's function has its file's name, and this package binds the *function* to that
name (``from splice.merge.learned import adamerging`` gives the callable): importing a
submodule sets the package attribute to the module, so the bindings below come after the
imports and win. The files themselves stay importable by their path
(``from splice.merge.learned.adamerging import ties_process``).
"""

from __future__ import annotations

from splice.merge.learned._base import ContinualStep, LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Samples
from splice.merge.learned.adamerging import adamerging
from splice.merge.learned.atlas import atlas
from splice.merge.learned.concrete import concrete
from splice.merge.learned.continual_task_arithmetic import continual_task_arithmetic
from splice.merge.learned.fisher import fisher
from splice.merge.learned.lot import lot
from splice.merge.learned.opcm import opcm
from splice.merge.learned.regmean import regmean
from splice.merge.learned.regmean_plusplus import regmean_plusplus

__all__ = [
    "ContinualStep",
    "LearnedMerge",
    "LearnedMethod",
    "Samples",
    "adamerging",
    "atlas",
    "concrete",
    "continual_task_arithmetic",
    "fisher",
    "learned",
    "lot",
    "opcm",
    "regmean",
    "regmean_plusplus",
]
