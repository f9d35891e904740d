"""Static deltas: a change ΔW to one tensor of a base model, in some parametrisation.

The value types (:class:`Dense`, :class:`LowRank`, :class:`Masked`, :class:`Sparse`,
:class:`Switch`) are in :mod:`splice.deltas.types`, their files (:func:`save_deltas`,
:func:`load_deltas`) in :mod:`splice.deltas.files`, and PEFT LoRA dirs as deltas in
:mod:`splice.deltas.peft`.
"""

from splice.deltas.files import DELTA_FORMAT, load_deltas, save_deltas
from splice.deltas.peft import peft_lowrank_deltas
from splice.deltas.types import (
    Delta,
    Dense,
    LowRank,
    Masked,
    Sparse,
    Switch,
    is_mergeable,
    lora_scale,
    task_vector,
)

__all__ = [
    "DELTA_FORMAT",
    "Delta",
    "Dense",
    "LowRank",
    "Masked",
    "Sparse",
    "Switch",
    "is_mergeable",
    "load_deltas",
    "lora_scale",
    "peft_lowrank_deltas",
    "save_deltas",
    "task_vector",
]
