"""Tiny models and calibration data for the compression tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.train.loop import minimise


class TinyNet(nn.Module):
    """conv → BN → ReLU6 → conv → BN → ReLU6 → pool → linear: EfficientNet's pattern, tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self.bn1(self.conv1(x)))
        x = nn.functional.relu6(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def calibrated_tinynet(batches: list[torch.Tensor]) -> TinyNet:
    """A TinyNet whose BN running statistics are those of ``batches`` (exactly)."""
    torch.manual_seed(0)
    net = TinyNet()
    for bn in (net.bn1, net.bn2):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    from splice.compress import reestimate_bn

    reestimate_bn(net, batches, lambda m, b: m(b))
    return net.eval()


@pytest.fixture
def images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(16, 3, 8, 8, generator=gen) * 2 - 0.5 for _ in range(4)]


@pytest.fixture
def tinynet(images: list[torch.Tensor]) -> TinyNet:
    return calibrated_tinynet(images)


@pytest.fixture
def steps():
    return minimise
