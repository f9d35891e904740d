from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn


class Tiny(nn.Module):
    """Two adaptable Linear layers of different shapes (d_in ≠ d_out) and a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(OrderedDict(q=nn.Linear(6, 9), act=nn.ReLU(), v=nn.Linear(9, 5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()
