"""RegMean++ against an independent layer-by-layer reference written from the procedure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.learned import learned, regmean, regmean_plusplus
from splice.merge.learned.regmean_plusplus import blocks

from ._toys import TASKS, inputs


class Block(nn.Module):
    def __init__(self, d: int = 5, h: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.out(x)


def _case(seed: int = 0):
    torch.manual_seed(seed)
    net = Net().double()
    g = torch.Generator().manual_seed(seed + 1)
    ds = {t: {n: 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
              for n, p in net.named_parameters()} for t in TASKS}  # fmt: skip
    return net, ds, inputs()


def _closed_form(ws, bs, xs, alpha):
    """RegMean on [x, 1]: (Σ W̃_t G̃_t)(Σ G̃_t)⁻¹ with off-diagonals scaled by α."""
    num = den = 0
    for w, b, x in zip(ws, bs, xs, strict=True):
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        g = xa.T @ xa
        g = alpha * g + (1 - alpha) * torch.diag(g.diagonal())
        num = num + torch.cat([w, b[:, None]], 1) @ g
        den = den + g
    sol = num @ torch.linalg.pinv(den, hermitian=True)
    return sol[:, :-1], sol[:, -1]


def _reference(net, ds, xs, alpha):
    p = {n: v.detach() for n, v in net.named_parameters()}
    expert = {t: {n: p[n] + ds[t][n] for n in p} for t in TASKS}
    merged = {}
    h = {t: xs[t] for t in TASKS}  # each task's input to the next block, through merged blocks
    for i in range(2):
        pre = f"layers.{i}."
        # fc1 sees the block input; fc2 sees the *expert's* fc1 output on it.
        f1 = [(expert[t][pre + "fc1.weight"], expert[t][pre + "fc1.bias"]) for t in TASKS]
        f2 = [(expert[t][pre + "fc2.weight"], expert[t][pre + "fc2.bias"]) for t in TASKS]
        mid = [torch.tanh(h[t] @ w.T + b) for t, (w, b) in zip(TASKS, f1, strict=True)]
        w1, b1 = _closed_form(*zip(*f1, strict=True), [h[t] for t in TASKS], alpha)
        w2, b2 = _closed_form(*zip(*f2, strict=True), mid, alpha)
        merged.update({pre + "fc1.weight": w1, pre + "fc1.bias": b1,
                       pre + "fc2.weight": w2, pre + "fc2.bias": b2})  # fmt: skip
        h = {t: h[t] + torch.tanh(h[t] @ w1.T + b1) @ w2.T + b2 for t in TASKS}
    fo = [(expert[t]["out.weight"], expert[t]["out.bias"]) for t in TASKS]
    merged["out.weight"], merged["out.bias"] = _closed_form(
        *zip(*fo, strict=True), [h[t] for t in TASKS], alpha
    )
    return merged


@pytest.mark.parametrize("alpha", [1.0, 0.9])
def test_matches_the_layer_by_layer_reference(alpha):
    net, ds, xs = _case()
    out = regmean_plusplus(net, ds, xs, alpha=alpha)
    ref = _reference(net, ds, xs, alpha)
    assert out.info["blocks"] == ["layers.0", "layers.1", "out"]
    for n, v in ref.items():
        torch.testing.assert_close(out.weights[n], v, rtol=1e-7, atol=1e-9)


def test_first_block_equals_regmean_later_ones_differ():
    net, ds, xs = _case(1)
    plus, plain = regmean_plusplus(net, ds, xs), regmean(net, ds, xs)
    for n in ("layers.0.fc1.weight", "layers.0.fc2.weight"):  # same inputs in both methods
        torch.testing.assert_close(plus.weights[n], plain.weights[n])
    gap = (plus.weights["layers.1.fc1.weight"] - plain.weights["layers.1.fc1.weight"]).abs()
    assert gap.max() > 1e-4  # the merged earlier block changes the later block's inputs


def test_one_task_returns_the_expert_and_registry():
    net, ds, xs = _case(2)
    one = {"a": ds["a"]}
    out = regmean_plusplus(net, one, {"a": xs["a"]}, alpha=1.0)
    for n, p in net.named_parameters():
        torch.testing.assert_close(out.weights[n], p.detach() + ds["a"][n])
    entry = learned.get("regmean_plusplus")
    assert entry.data == "unlabeled" and set(entry.defaults()) == set(entry.Params.model_fields)
    with pytest.raises(SpliceError, match="no data for task"):
        regmean_plusplus(net, ds, {"a": xs["a"]})


def test_blocks_group_transformer_layers():
    net, ds, _ = _case()
    from splice.merge.learned.regmean import _linear_layers

    layers = _linear_layers(net, set(ds["a"]))
    assert blocks(layers) == {
        "layers.0": ["layers.0.fc1", "layers.0.fc2"],
        "layers.1": ["layers.1.fc1", "layers.1.fc2"],
        "out": ["out"],
    }
