"""Batch-norm re-estimation after quantization (spec other.md §4.5).

[lib] The paper folds each BN into its convolution, quantizes, re-inserts a BN initialised as
the identity on the folded affine, re-estimates its running statistics and folds back. With
per-output-channel weight quantization folding commutes with quantization (a channel's scale
absorbs the BN factor), so here the BN stays in place and only its running mean and variance
are re-estimated on the quantized network's outputs, affine frozen: each channel leaves the
BN again with mean ``β`` and standard deviation ``≈ |γ|``, the statistics the
full-precision network had.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from splice.compress.capture import Forward

__all__ = ["batchnorms", "reestimate_bn"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> list[str]:
    """Names of the batch-norm modules that track running statistics."""
    return [n for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any], forward: Forward) -> int:
    """Reset and re-estimate every BN's running mean/var over ``batches`` (a cumulative
    average, as ``momentum=None``); everything else stays in eval mode. Returns the count."""
    names = batchnorms(model)
    was_training = model.training
    model.eval()
    saved = {}
    for n in names:
        bn = model.get_submodule(n)
        saved[n] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for n in names:
            bn = model.get_submodule(n)
            bn.momentum = saved[n]
            bn.eval()
        model.train(was_training)
    return len(names)
