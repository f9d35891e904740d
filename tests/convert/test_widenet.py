"""WideNet (splice.convert.widenet): parameter formula, MoE routing, capacity, sharing."""

from __future__ import annotations

import pytest
import torch

from splice.convert.widenet import MoE, ViTConfig, WideNet, widenet_parameters


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "cfg",
    [ViTConfig(), ViTConfig(dim=32, depth=3, hidden=48, experts=6, image_size=8, patch=2)],
)
def test_parameter_formula(cfg):
    assert count(WideNet(cfg)) == widenet_parameters(cfg)


def test_widenet_shares_attention_and_moe_and_is_smaller():
    cfg = ViTConfig(depth=6)
    wide, vit = WideNet(cfg), WideNet(cfg.model_copy(update={"kind": "vit"}))
    moe = WideNet(cfg.model_copy(update={"kind": "vit-moe"}))
    assert len(wide.attn) == 1 and len(wide.ffn) == 1 and len(wide.ln1) == 6
    assert count(wide) < count(vit) < count(moe)
    assert sum(isinstance(f, MoE) for f in moe.ffn) == 3


def test_moe_matches_per_token_top2_without_capacity_limit():
    torch.manual_seed(0)
    cfg = ViTConfig(dim=8, hidden=12, experts=4, capacity_eval=100.0)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 5, 8)
    out, balance = moe(x)
    flat = x.reshape(-1, 8)
    probs = moe.router(flat).softmax(-1)
    want = torch.zeros_like(flat)
    firsts = torch.zeros(4)
    for t in range(len(flat)):
        g, e = probs[t].topk(2)
        g = g / g.sum()
        firsts[e[0]] += 1
        for gate, expert in zip(g, e, strict=True):
            want[t] += gate * moe.experts[int(expert)](flat[t])
    torch.testing.assert_close(out.reshape(-1, 8), want)
    expected = 4 * (firsts / len(flat) * probs.mean(0)).sum()
    torch.testing.assert_close(balance, expected)


def test_capacity_drops_overflow_first_choices_first():
    cfg = ViTConfig(dim=4, hidden=6, experts=4, capacity_eval=0.5)  # cap = ceil(.5·4·2/4) = 1
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 2.0  # every token: expert 0 first, expert 1 second
        moe.router.weight[1, 0] = 1.0
    x = torch.randn(4, 4).abs() + 0.1  # positive first feature: the order holds
    out, _ = moe(x)
    assert out[0].abs().sum() > 0 and torch.equal(out[1:], torch.zeros(3, 4))


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    model = WideNet(ViTConfig(image_size=8, patch=2, depth=2))
    with torch.no_grad():
        model.head.weight.normal_()
    images = torch.randn(3, 1, 8, 8)
    model.eval()
    a, b = model(images)[0], model(images)[0]
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(images)[0], model(images)[0])
