"""MoLA (spec §5): per-layer experts, top-k router and load-balancing loss by hand."""

from __future__ import annotations

import pytest
import torch

from splice.adapters import adapter_layers, aux_loss, inject
from splice.adapters._primitives import load_balance_loss, softmax_topk
from splice.errors import SpliceError

from .conftest import make_model, perturb

CONTRACT_CASES = {"mola": dict(r=2, experts=[2, 3, 4], top_k=2)}  # for test_contract.py


def test_topk_weights_renormalised_and_sum_to_one():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    w, p = softmax_topk(logits, 2)
    p_hand = logits.exp() / logits.exp().sum(-1, keepdim=True)
    assert torch.allclose(p, p_hand)
    top = p_hand[0, :2]
    assert torch.allclose(w[0], torch.cat([top / top.sum(), torch.zeros(2)]))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert (w > 0).sum(-1).tolist() == [2, 2]


def test_balance_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    k, n, e = 1, 4, 3
    p = logits.softmax(-1)
    top1 = [0, 1, 0, 2]
    f = torch.tensor([top1.count(i) / (n * k) for i in range(e)])
    expected = e * (f * p.mean(0)).sum()
    assert torch.allclose(load_balance_loss(logits, k), expected)


def test_balance_loss_is_one_under_uniform_routing():
    assert torch.allclose(load_balance_loss(torch.zeros(6, 4), 2), torch.tensor(1.0))


def test_per_layer_expert_counts_and_model_aux_loss():
    model, x = make_model("linear")
    inject(model, "mola", ["proj"], r=2, experts=[2, 3, 4], top_k=2, balance_coef=0.001)
    counts = [a.adapter.n_experts for a in adapter_layers(model).values()]
    assert counts == [2, 3, 4]
    model.train()
    model(x)
    layers = list(adapter_layers(model).values())
    hand = sum(load_balance_loss(a.adapter.last_logits, 2) for a in layers)
    loss = aux_loss(model)
    assert torch.allclose(loss, 0.001 * hand)
    loss.backward()
    assert layers[0].adapter.router.grad.abs().sum() > 0


def test_one_expert_top1_is_lora():
    lora, x = make_model("linear")
    mola, _ = make_model("linear")
    inject(lora, "lora", ["proj"], r=2, alpha=4)
    inject(mola, "mola", ["proj"], r=2, alpha=4, experts=1, top_k=1, dropout=0.0)
    perturb(lora)
    with torch.no_grad():
        for a, b in zip(adapter_layers(lora).values(), adapter_layers(mola).values(), strict=True):
            b.adapter.lora_A.copy_(a.adapter.lora_A)
            b.adapter.lora_B.copy_(a.adapter.lora_B)
        assert torch.allclose(lora(x), mola(x), atol=1e-6)


def test_routing_selects_top_k_experts_per_token():
    model, x = make_model("linear")
    inject(model, "mola", ["layers.0.proj"], r=1, alpha=1, experts=3, top_k=1, dropout=0.0)
    layer = model.layers[0]["proj"]
    a = layer.adapter
    with torch.no_grad():
        a.lora_B.copy_(torch.randn_like(a.lora_B))
        base = layer.base_layer(x)
        out = a(x, base.clone())
        choice = (x @ a.router.t()).argmax(-1)  # top-1 expert per token, gate weight 1
        for e in range(3):
            hand = base + (x @ a.lora_A[e : e + 1].t()) @ a.lora_B[:, e : e + 1].t()
            sel = choice == e
            assert torch.allclose(out[sel], hand[sel], atol=1e-6)


def test_experts_list_must_cover_every_layer_and_top_k():
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match="none for layer 2"):
        inject(model, "mola", ["proj"], experts=[2, 2])
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match="top_k=3 > 2 experts"):
        inject(model, "mola", ["proj"], experts=[2, 4, 4], top_k=3)
