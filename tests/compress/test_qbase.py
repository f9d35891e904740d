"""LoRA on a quantized frozen base (QLoRA-style; issue #28, deliverable 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splice.adapters import adapter_layers, inject
from splice.compress import QuantLayer, quant_layers, quantize_base
from splice.errors import SpliceError
from splice.train.loop import TrainStep, fit


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
        torch.nn.Linear(24, 3),
    )  # fmt: skip


def test_lora_on_a_4_bit_base_trains_only_the_factors_and_keeps_the_codes():
    model = _model()
    inject(model, "lora", ["0", "2"], r=4, modules_to_save=["4"])  # a trainable head
    names = quantize_base(model, 4)
    assert names == ["0.base_layer", "2.base_layer"]  # the head is trainable: kept in float
    quant = dict(quant_layers(model))
    assert all(q.base.weight is None for q in quant.values())  # the float weights are gone
    before = {k: t.clone() for k, t in model.state_dict().items() if k not in _trainable(model)}
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay would move a base

    def loss(i: int):
        return F.cross_entropy(model(x), y), len(x)

    state = fit(TrainStep(loss, opt), 30)
    assert state.history[-1] < 0.9 * state.history[0]
    loss(0)[0].backward()  # one more backward: where do gradients arrive?
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached == set(_trainable(model))
    assert reached == {"0.adapter.lora_A", "0.adapter.lora_B", "2.adapter.lora_A",
                       "2.adapter.lora_B", "4.weight", "4.bias"}  # fmt: skip
    after = {k: t for k, t in model.state_dict().items() if k not in _trainable(model)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # codes, steps, zeros, biases
    h = torch.randn(5, 24)
    layer = adapter_layers(model)["2"]
    q: QuantLayer = layer.base_layer
    with torch.no_grad():  # the forward is LoRA on the dequantised weight
        w = q.weight_scale * (q.qweight.float() - q.weight_zero)
        a, b = layer.adapter.lora_A, layer.adapter.lora_B
        ref = F.linear(h, w + layer.adapter.scale * b @ a, q.base.bias)
        assert torch.allclose(layer(h), ref, atol=1e-5)


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_bits_outside_2_to_8_and_nothing_to_quantize_are_errors():
    with pytest.raises(SpliceError, match="base bits 1 is not supported"):
        quantize_base(_model(), 1)
    model = _model()
    model.requires_grad_(True)
    with pytest.raises(SpliceError, match="no frozen Linear/Conv layer"):
        quantize_base(model, 4)


def test_quant_linear_matches_the_quant_layer_and_saves_no_float_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    plain = QuantLayer(torch.nn.Linear(6, 4), 4, a_bits=None)
    plain.base.load_state_dict(lin.state_dict())
    plain.wq.init_minmax(lin.weight.min(1).values, lin.weight.max(1).values)
    plain.freeze()
    model = torch.nn.Sequential(lin).requires_grad_(False)
    quantize_base(model, 4)
    fast = model[0]
    assert type(fast).__name__ == "QuantLinear" and torch.equal(fast.qweight, plain.qweight)
    x = torch.randn(3, 5, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fast(x)
    assert torch.allclose(y, plain(x), atol=1e-6)
    assert not any(t.is_floating_point() and t.shape == (4, 6) for t in saved)  # codes only
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (ref,) = torch.autograd.grad(plain(x).square().sum(), x)
    assert torch.allclose(gx, ref, atol=1e-5)
