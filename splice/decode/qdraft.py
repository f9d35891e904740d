"""Self-speculation with the target's own weights in int8 (issue #29, spec other.md §1.9 (a)).

The drafter is a copy of the target (or of its first ``k`` blocks, :func:`early_exit`) whose
``nn.Linear`` layers, the 49,152 × 576 head of SmolLM2 included, are dynamically quantised to
int8 (per-output-channel weights, activations quantised per call; ``torch.ao`` with the
fbgemm/qnnpack CPU kernels). It shares the target's tokenizer, reads a quarter of the matrix
bytes per step and agrees with most of the target's confident argmaxes (activation outliers
keep it from agreeing with all: per-tensor activation scales). The lossless and greedy
policies keep the output exactly the target's: the int8 copy only proposes. [recon]
Quantised self-drafting is our choice for a CPU without a smaller same-tokenizer model (QSpec
and similar work draft with a low-precision copy of the target); the spec's self-speculation
(§1.9 (a)) names the target's early layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from splice.decode.selfdraft import early_exit
from splice.errors import SpliceError

__all__ = ["int8_draft"]


def int8_draft(model: nn.Module, k: int | None = None) -> nn.Module:
    """An int8 copy of ``model`` (its first ``k`` blocks when given) to draft with; CPU only.

    The target is left untouched (its weights stay shared with nothing the copy changes).
    """
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        raise SpliceError(
            f"an int8 drafter runs on the CPU only; the target is on {p.device}",
            fix="use --self-draft K or --draft DIR on an accelerator",
        )
    src = model if k is None else early_exit(model, k)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes
        spec = {nn.Linear: per_channel_dynamic_qconfig}
        return quantize_dynamic(src, spec, dtype=torch.qint8, inplace=False).eval()
