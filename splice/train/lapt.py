"""LAPT training through the one loop (other.md §7.7; pieces in :mod:`splice.analysis.lapt`).

Defaults follow the released code where CPU allows: full fine-tuning, LR 1e-4, cosine schedule
with 10 % warm-up, AdamW (the code's paged 32-bit AdamW needs a GPU library), weight decay
2e-6, batch 1 with gradient accumulation 2, ``max_steps`` 20; fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from splice.analysis.lapt import collate_sft, lapt_loss
from splice.train.loop import LoopState, TrainStep, fit

__all__ = ["train_lapt"]


def train_lapt(
    model: nn.Module,
    pairs: Sequence[tuple[Tensor, Tensor]],
    layer: int,
    *,
    steps: int = 20,
    lr: float = 1e-4,
    batch_size: int = 1,
    grad_accum: int = 2,
    weight_decay: float = 2e-6,
    warmup: float = 0.1,
    pad_id: int = 0,
    seed: int = 42,
    progress: bool = False,
) -> LoopState:
    """Fine-tune ``model`` in place on (prompt, safe response) ``pairs`` with LAPT at ``layer``;
    examples are visited in a seeded shuffled order, cycling."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=gen).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def micro(i: int) -> tuple[Tensor, int]:
        start = i * batch_size
        chunk = [pairs[order[(start + j) % len(order)]] for j in range(batch_size)]
        return lapt_loss(model, collate_sft(chunk, pad_id), layer, gen), batch_size

    model.train()
    step = TrainStep(micro, opt, sched, grad_accum=grad_accum)
    state = fit(step, steps, progress=progress)
    model.eval()
    return state
