"""A quantized embedding looks up rows before quantizing them: the values and gradients of
quantizing the whole table first. Under autograd a quantized layer keeps its fake-quant input
and weight as codes: no float copy in the graph, the fake-quant reference's values and
gradients bit for bit."""

from __future__ import annotations

import copy
import gc
import weakref

import torch
from torch import nn
from torch.func import functional_call

from splice.compress import QuantLayer, fake_quant


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


def _conv_layer() -> QuantLayer:
    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(3, 4, 3, padding=1), 4, 8)
    layer.aq.init_minmax(torch.tensor(-1.5), torch.tensor(2.0))
    return layer


def test_a_graph_through_a_quantized_layer_keeps_no_float_quantized_input_or_weight():
    layer = _conv_layer().requires_grad_(False)
    layer.base.bias.requires_grad_(True)  # bias tuning: only the biases train
    seen: list[weakref.ref] = []
    layer.base.register_forward_pre_hook(
        lambda mod, args: seen.extend([weakref.ref(args[0]), weakref.ref(mod.weight)])
    )
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = layer(x)
    gc.collect()
    assert len(seen) == 2 and all(ref() is None for ref in seen)  # the conv saved codes only
    out.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    bias = layer.base.bias.detach().clone().requires_grad_(True)
    weight = fake_quant(layer.base.weight, layer.wq.range, layer.wq.low, 4)
    ref = nn.functional.conv2d(
        fake_quant(ref_x, layer.aq.range, layer.aq.low, 8), weight, bias, padding=1
    )
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(layer.base.bias.grad, bias.grad)


def test_every_gradient_of_a_quantized_layer_equals_the_fake_quant_reference():
    layer = _conv_layer()
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    layer(x).square().sum().backward()
    weight = fake_quant(ref.base.weight, ref.wq.range, ref.wq.low, 4)
    inputs = fake_quant(x, ref.aq.range, ref.aq.low, 8)
    nn.functional.conv2d(inputs, weight, ref.base.bias, padding=1).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
