"""Self-speculation with the target's own weights in int8 (issue #29, spec other.md §1.9 (a)).

The drafter is a copy of the target (or of its first ``k`` blocks, :func:`early_exit`) whose
``nn.Linear`` layers, the 49,152 × 576 head of SmolLM2 included, are dynamically quantised to
int8 (per-tensor weights, activations quantised per call; ``torch.ao`` with the fbgemm/qnnpack
CPU kernels). It shares the target's tokenizer and nearly all of its argmaxes, and on a CPU,
where a decoding step is bound by reading the weights, it reads a quarter of the bytes. The
lossless and greedy policies then keep the output exactly the target's: the int8 copy only
proposes. [recon] Quantised self-drafting is our choice for a CPU without a smaller
same-tokenizer model (QSpec and similar work draft with a low-precision copy of the target);
the spec's self-speculation (§1.9 (a)) names the target's early layers.
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
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes
        return quantize_dynamic(src, {nn.Linear}, dtype=torch.qint8, inplace=False).eval()
