"""PEFT LoRA adapter dirs as :class:`~splice.deltas.LowRank` deltas.

:mod:`splice.io.peft` reads the raw factors and their scale parameters; this turns each pair
into one :class:`~splice.deltas.LowRank` keyed by the base model's tensor name, with PEFT's
scale (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA), transposed per module for GPT-2
``Conv1D`` (:func:`splice.io.peft.conv1d_modules`).
"""

from __future__ import annotations

from splice.deltas.types import LowRank, lora_scale
from splice.errors import SpliceError
from splice.io.checkpoint import Checkpoint
from splice.io.peft import peft_lora_factors

__all__ = ["peft_lowrank_deltas"]


def peft_lowrank_deltas(ckpt: Checkpoint, *, model_type: str | None = None) -> dict[str, LowRank]:
    """LoRA pairs of a PEFT adapter :class:`Checkpoint` as ``{base_tensor_name: LowRank}``.

    ``model_type``: the base model's ``config.json`` ``model_type``, which tells the GPT-2
    ``Conv1D`` modules (stored (in, out)) from ``nn.Linear`` ones; default: the config of the
    local dir that ``base_model_name_or_path`` names, if any.

    Raises:
        SpliceError: see :func:`~splice.io.peft.peft_lora_factors`; or the dir cannot tell
            which modules are ``Conv1D`` and ``model_type`` is not known.
    """
    factors = peft_lora_factors(ckpt, model_type=model_type)
    unknown = sorted(name for name, f in factors.items() if f.transpose is None)
    if unknown:
        raise SpliceError(
            f"cannot tell whether {unknown[0]!r} is a GPT-2 Conv1D (weight stored (in, out)) or "
            "an nn.Linear: peft saves fan_in_fan_out once per dir, and the base model's "
            "config is not at hand",
            where=str(ckpt.path),
            fix="pass the base (load_deltas(path, base=...), `base:` in a merge recipe), or "
            "set base_model_name_or_path in adapter_config.json to the local base model dir",
        )
    return {
        name: LowRank(
            f.B, f.A, lora_scale(f.alpha, f.A.shape[0], f.rslora), f.shape, bool(f.transpose)
        )
        for name, f in factors.items()
    }
