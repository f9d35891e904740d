"""A tiny layered model for the selectors: ``layers.{i}.{a,b}`` Linear blocks and a head."""

from __future__ import annotations

import torch
from torch import nn

from tests.train.test_train import bert_dir, csv_file  # noqa: F401  (fixtures, for train tests)


class Tiny(nn.Module):
    def __init__(self, d: int = 6, n_layers: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"a": nn.Linear(d, 2 * d), "b": nn.Linear(2 * d, d)})
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["b"](torch.tanh(layer["a"](x)))
        return self.head(x)


def data(n: int = 32, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
