"""AdaQuant (spec other.md §4.3) on a tiny conv: it lowers the layer's reconstruction error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.compress import AdaQuantConfig, QuantLayer, adaquant_problem, capture, layer_mse, wrap
from splice.compress.adaquant import Rows, init_input_range


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


@pytest.mark.parametrize(
    ("base", "shape", "unit"),
    [
        (nn.Conv2d(3, 4, 3), (3, 8, 8), (3, 8, 8)),  # a sample
        (nn.Linear(6, 2), (5, 6), (6,)),  # a token's row
        (nn.Embedding(9, 2), (5,), ()),  # a token id
    ],
)
def test_rows_draw_from_the_cache_as_if_it_were_concatenated(base, shape, unit):
    gen = torch.Generator().manual_seed(0)
    if isinstance(base, nn.Embedding):
        ts = [torch.randint(9, (n, *shape), generator=gen) for n in (4, 1, 7)]
    else:
        ts = [torch.randn(n, *shape, generator=gen) for n in (4, 1, 7)]
    rows = Rows(QuantLayer(base, 4), ts)
    units = torch.cat([t.reshape(-1, *unit) for t in ts])
    assert len(rows) == len(units) and rows.samples == 12
    idx = torch.randint(len(units), (40,), generator=gen)  # repeats too
    assert torch.equal(rows[idx], units[idx.sort().values])
