"""DoRA specifics: the factor-form norm equals the dense one, the forward equals the
definition W' = m ⊙ (W + s·B@A)/‖W + s·B@A‖ applied to the input."""

from __future__ import annotations

import pytest
import torch

from splice.adapters import adapter_layers, inject

from .conftest import make_model, perturb

CONTRACT_CASES = {"dora": dict(r=4, alpha=8)}  # for test_contract.py


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv3x3"])
def test_forward_equals_the_decomposed_weight(kind):
    model, x = make_model(kind)
    inject(model, "dora", ["proj"], r=3, alpha=6)
    perturb(model)
    layer = next(iter(adapter_layers(model).values()))
    a = layer.adapter
    site = a.site
    w = site.canonical(layer.weight.detach().clone())
    v = w + a.scale * (a.lora_B @ a.lora_A)
    wd = site.stored(a.magnitude[:, None] * v / v.norm(dim=1, keepdim=True))
    assert torch.allclose(a._norm(a.lora_B, a.lora_A), v.norm(dim=1).detach(), atol=1e-5)
    reference = type(layer.base_layer)  # a copy of the base layer with W' swapped in
    with torch.no_grad():
        expected = layer(x)
        layer.base_layer.weight.copy_(wd)
        plain = reference.forward(layer.base_layer, x)
    assert torch.allclose(plain, expected, atol=1e-5)


def test_magnitude_starts_at_the_weight_norm_and_gets_a_gradient():
    model, x = make_model("linear")
    inject(model, "dora", ["proj"], r=2)
    a = model.layers[0]["proj"].adapter
    assert torch.allclose(a.magnitude, model.layers[0]["proj"].weight.norm(dim=1))
    model(x).sum().backward()
    assert a.magnitude.grad is not None and a.magnitude.grad.abs().sum() > 0


def test_lora_export_is_a_truncated_svd_with_its_error_reported(tmp_path):
    import json

    from splice.adapters import adapter_deltas, load_adapter, save_adapter
    from splice.errors import SpliceError

    model, x = make_model("linear")
    inject(model, "dora", ["proj"], r=3)
    perturb(model)
    with pytest.raises(SpliceError, match=r"not low-rank.*rank=N"):
        save_adapter(model, tmp_path / "none", format="peft-lora")
    deltas = adapter_deltas(model)
    save_adapter(model, tmp_path / "r2", format="peft-lora", rank=2)
    report = json.loads((tmp_path / "r2" / "lora_export.json").read_text())
    for name, err in report["relative_error"].items():
        s = torch.linalg.svdvals(deltas[f"{name}.weight"].materialize().double())
        assert err == pytest.approx((s[2:].square().sum() / s.square().sum()).sqrt().item())
    save_adapter(model, tmp_path / "full", format="peft-lora", rank=8)  # min(d_in, d_out)
    fresh, _ = make_model("linear")
    load_adapter(fresh, tmp_path / "full")
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)
