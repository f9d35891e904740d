"""Tiny models, one per adaptable layer kind, and the method table of the contract battery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

N_LAYERS = 3

# One line per method configuration; a new method joins the battery here.
METHOD_CASES = {
    "lora": ("lora", dict(r=4, alpha=8)),
    "rslora": ("lora", dict(r=4, alpha=8, use_rslora=True, dropout=0.1)),
    "nola": ("nola", dict(r=4, k=16, l=16, dropout=0.1)),
    "mos": ("mos", dict(r=4, e=2, p=1, l=2)),
    "mos_shared": ("mos", dict(r=4, e=2, p=0, l=1)),
    "mola": ("mola", dict(r=2, experts=[2, 3, 4], top_k=2)),
    "ept": ("ept", dict(r=4, kernels=[2, 2, 4], top_k=2, tasks=2)),
}


def _conv1d_gpt2(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


# kind → (layer factory, input factory); d_in ≠ d_out everywhere to catch transposes
KINDS = {
    "linear": (lambda: nn.Linear(8, 12), lambda: torch.randn(2, 5, 8)),
    "conv1d_gpt2": (lambda: _conv1d_gpt2(8, 12), lambda: torch.randn(2, 5, 8)),
    "embedding": (lambda: nn.Embedding(20, 8, padding_idx=0), lambda: torch.randint(0, 20, (2, 5))),
    "conv1x1": (lambda: nn.Conv2d(4, 6, 1), lambda: torch.randn(2, 4, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 6, 6)),
}
SITE_KIND = {"conv1x1": "conv", "conv3x3": "conv"}


class Stack(nn.Module):
    """``layers.{i}.proj`` for i < N_LAYERS, all of one kind, outputs summed (plus a head)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        make = KINDS[kind][0]
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": make()}) for _ in range(N_LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer["proj"](x).tanh() for layer in self.layers)


def make_model(kind: str, seed: int = 0) -> tuple[Stack, torch.Tensor]:
    torch.manual_seed(seed)
    model = Stack(kind).eval()
    return model, KINDS[kind][1]()


def perturb(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Move every trainable parameter off its init so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(params=sorted(METHOD_CASES))
def case(request):
    return METHOD_CASES[request.param]
