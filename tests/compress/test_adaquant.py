"""AdaQuant (spec other.md §4.3) on a tiny conv: it lowers the layer's reconstruction error."""

from __future__ import annotations

import copy

import torch
from torch import nn

from splice.compress import AdaQuantConfig, adaquant_problem, capture, layer_mse, wrap
from splice.compress.adaquant import init_input_range


def test_adaquant_reduces_the_layer_mse_of_a_tiny_conv(steps):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(32, 4, 6, 6, generator=gen) for _ in range(4)]
    q = copy.deepcopy(fp)
    layer = wrap(q, "2", 3, 4)
    run = lambda m, b: m(b)  # noqa: E731
    xs, ys = capture(fp, "2", batches, run)
    init_input_range(layer, xs)
    before = layer_mse(layer, xs, ys)
    loss, opt = adaquant_problem(layer, xs, ys, AdaQuantConfig(iters=300, batch=16))
    steps(loss, opt, 300)
    after = layer_mse(layer, xs, ys)
    assert after < 0.9 * before, (before, after)


def test_capture_stops_after_the_layer_and_returns_every_batch():
    calls = []
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[1].register_forward_hook(lambda m, a, o: calls.append(1))
    batches = [torch.randn(5, 3), torch.randn(2, 3)]
    xs, ys = capture(net, "0", batches, lambda m, b: m(b))
    assert [x.shape[0] for x in xs] == [5, 2] and not calls
    assert torch.equal(ys[1], net[0](batches[1]))
