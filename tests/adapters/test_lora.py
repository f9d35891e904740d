"""LoRA / rsLoRA specifics (spec §1): init as the reference code, the α/√r switch."""

from __future__ import annotations

import math

import torch

from splice.adapters import adapter_deltas, adapter_layers, inject

from .conftest import make_model, perturb

CONTRACT_CASES = {  # configurations the contract battery (test_contract.py) runs
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, use_rslora=True, dropout=0.1),
}


def test_init_a_uniform_b_zero_and_embedding_roles_swapped():
    model, _ = make_model("linear")
    inject(model, "lora", ["proj"], r=4)
    a = model.layers[0]["proj"].adapter
    assert a.lora_A.abs().max() <= 1 / math.sqrt(8) and a.lora_A.std() > 0
    assert not a.lora_B.any()
    emb, _ = make_model("embedding")
    inject(emb, "lora", ["proj"], r=4)
    e = emb.layers[0]["proj"].adapter
    assert not e.lora_A.any() and e.lora_B.std() > 0.5


def test_rslora_changes_only_the_scale():
    plain, _ = make_model("linear")
    rs, _ = make_model("linear")
    torch.manual_seed(0)
    inject(plain, "lora", ["proj"], r=4, alpha=8)
    torch.manual_seed(0)
    inject(rs, "lora", ["proj"], r=4, alpha=8, use_rslora=True)
    perturb(plain)
    perturb(rs)
    d_plain, d_rs = adapter_deltas(plain), adapter_deltas(rs)
    for name, d in d_plain.items():
        assert d.scale == 8 / 4 and d_rs[name].scale == 8 / math.sqrt(4)
        assert torch.allclose(d_rs[name].materialize(), d.materialize() * math.sqrt(4), atol=1e-6)


def test_dropout_acts_on_the_adapter_branch_only():
    model, x = make_model("linear")
    inject(model, "lora", ["proj"], r=4, dropout=0.5)
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        base = layer.base_layer(x)
        layer.train()
        assert torch.equal(layer(x), base)  # B = 0: dropout cannot reach the base path
        perturb(model)
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        assert not torch.equal(a, layer(x))
        layer.eval()
        assert torch.equal(layer(x), layer(x))
