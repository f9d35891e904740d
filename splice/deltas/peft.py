"""PEFT LoRA adapter dirs as :class:`~splice.deltas.LowRank` deltas.

:mod:`splice.io.peft` reads the raw factors and their scale parameters; this turns each pair
into one :class:`~splice.deltas.LowRank` keyed by the base model's tensor name, with PEFT's
scale (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

from splice.deltas.types import LowRank, lora_scale
from splice.io.checkpoint import Checkpoint
from splice.io.peft import peft_lora_factors

__all__ = ["peft_lowrank_deltas"]


def peft_lowrank_deltas(ckpt: Checkpoint) -> dict[str, LowRank]:
    """LoRA pairs of a PEFT adapter :class:`Checkpoint` as ``{base_tensor_name: LowRank}``.

    Raises:
        SpliceError: not LoRA/DoRA, A without B, rank that disagrees with the config.
    """
    return {
        name: LowRank(f.B, f.A, lora_scale(f.alpha, f.A.shape[0], f.rslora), f.shape, f.transpose)
        for name, f in peft_lora_factors(ckpt).items()
    }
