"""A quantized embedding looks up rows before quantizing them: the values and gradients of
quantizing the whole table first."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from splice.compress import QuantLayer


def test_an_embedding_quantizes_only_the_rows_it_looks_up_with_the_same_result():
    torch.manual_seed(0)
    layer = QuantLayer(nn.Embedding(12, 5, padding_idx=0), 3)
    ids = torch.tensor([[0, 3, 3, 7], [11, 0, 2, 3]])  # repeats and the padding row

    def grads(out):
        layer.zero_grad()
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        return [p.grad.clone() for p in (layer.base.weight, layer.wq.range, layer.wq.low)]

    fast = layer(ids)
    whole = functional_call(layer.base, {"weight": layer.quant_weight()}, (ids,))
    assert torch.equal(fast, whole)
    for a, b in zip(grads(layer(ids)), grads(whole), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.count_nonzero(grads(layer(ids))[1][[1, 4, 5]]) == 0  # rows never looked up
