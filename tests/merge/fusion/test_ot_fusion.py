"""Transformer fusion with OT: permuted-copy reduction, self-fusion, widths, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.fusion._ot import barycentric, solve
from splice.merge.fusion.ot_fusion import layout, ot_fuse


def _mlp(seed: int, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden),
        nn.GELU(), nn.Linear(hidden, 3),
    )  # fmt: skip


def _permuted(model: nn.Sequential, seed: int = 9) -> nn.Sequential:
    """The same function with both hidden layers' neurons shuffled."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    p1, p2 = (torch.randperm(16, generator=g) for _ in range(2))
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight[p1]), out[0].bias.copy_(model[0].bias[p1])
        out[2].weight.copy_(model[2].weight[p2][:, p1]), out[2].bias.copy_(model[2].bias[p2])
        out[3].weight.copy_(model[3].weight[p2]), out[3].bias.copy_(model[3].bias[p2])
        out[5].weight.copy_(model[5].weight[:, p2])
    return out


class _ViT(nn.Module):
    """Token embedding, a class token, two pre-LN encoder layers, final norm, head."""

    def __init__(self, seed: int, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        return self.head(self.norm(self.blocks(h))[:, 0])


def _permute_ff(vit: _ViT, seed: int = 4) -> _ViT:
    """Shuffle the feed-forward neurons of every encoder layer (same function)."""
    out = copy.deepcopy(vit)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in out.blocks.layers:
            p = torch.randperm(16, generator=g)
            (
                lay.linear1.weight.copy_(lay.linear1.weight[p]),
                lay.linear1.bias.copy_(lay.linear1.bias[p]),
            )
            lay.linear2.weight.copy_(lay.linear2.weight[:, p])
    return out


def _close(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=n)


def test_fusing_a_model_with_its_permuted_copy_returns_the_original():
    model = _mlp(0)
    x = torch.randn(200, 6)
    copy_ = _permuted(model)
    torch.testing.assert_close(copy_(x), model(x), atol=1e-5, rtol=0)
    fused = ot_fuse([model, copy_], x, solver="emd").model
    _close(fused, model)
    fused = ot_fuse([model, copy_], None, cost="weights", solver="emd").model
    _close(fused, model)


def test_transformer_permuted_copy_and_self_fusion():
    vit = _ViT(0)
    x = torch.randn(64, 5, 4)
    other = _permute_ff(vit)
    torch.testing.assert_close(other(x), vit(x), atol=1e-5, rtol=0)
    _close(ot_fuse([vit, other], x, solver="emd").model, vit)
    _close(ot_fuse([vit, vit, vit], x, solver="emd").model, vit)
    kinds = [op.kind for op in layout(vit)[0]]
    assert kinds.count("attn") == 2 and kinds[-1] == "head"


def test_heterogeneous_widths_take_the_anchors_shape_and_beat_a_bad_map():
    a, b = _mlp(0, hidden=16), _mlp(1, hidden=24)
    x = torch.randn(100, 6)
    fused = ot_fuse([a, b], x, solver="sinkhorn").model
    assert [p.shape for p in fused.parameters()] == [p.shape for p in a.parameters()]
    t = solve(torch.rand(24, 16), "emd")
    torch.testing.assert_close(t.sum(1), torch.ones(24, dtype=t.dtype))
    torch.testing.assert_close(barycentric(t).sum(0), torch.ones(16, dtype=t.dtype))


def test_bad_input_is_one_line():
    deep = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))  # fmt: skip
    with pytest.raises(SpliceError, match="same depth") as e:
        ot_fuse([_mlp(0), deep], torch.randn(10, 6))
    assert "\n" not in str(e.value)
    with pytest.raises(SpliceError, match="at least 2 models"):
        ot_fuse([_mlp(0)], torch.randn(10, 6))
    with pytest.raises(SpliceError, match="need data"):
        ot_fuse([_mlp(0), _mlp(1)])
    with pytest.raises(SpliceError, match="Conv2d"):
        layout(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)))
