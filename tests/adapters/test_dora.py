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


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d_gpt2", "conv3x3"])
def test_gradients_equal_the_decomposed_weights(kind):
    """x's, A's, B's and m's gradients equal autograd's through the dense W' with its norm
    detached (a frozen Linear alone runs the fused function; the other kinds the plain path)."""
    model, x = make_model(kind.removesuffix("_nobias"))
    if kind.endswith("_nobias"):
        for block in model.layers:
            block["proj"].bias = None
    inject(model, "dora", ["proj"], r=3, alpha=6)
    perturb(model)
    layer = next(iter(adapter_layers(model).values()))
    a, site = layer.adapter, layer.adapter.site
    x = x.clone().requires_grad_()
    out = layer(x)
    nodes, seen = [out.grad_fn], []
    while nodes:
        node = nodes.pop()
        seen.append(type(node).__name__)
        nodes += [n for n, _ in node.next_functions if n is not None]
    assert ("_RescaledBackward" in seen) == kind.startswith("linear")
    params = [x, a.lora_A, a.lora_B, a.magnitude]
    cot = torch.randn_like(out)
    got = torch.autograd.grad(out, params, cot)
    v = site.canonical(layer.weight.detach()) + a.scale * (a.lora_B @ a.lora_A)
    wd = site.stored(a.magnitude[:, None] * v / v.norm(dim=1, keepdim=True).detach())
    tensors = {"weight": wd, **({"bias": layer.base_layer.bias} if kind != "linear_nobias" else {})}
    ref = torch.func.functional_call(layer.base_layer, tensors, (x,))
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(got, torch.autograd.grad(ref, params, cot), strict=True):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)


def test_autocast_runs_the_plain_path_in_the_autocast_dtype():
    model, x = make_model("linear")
    inject(model, "dora", ["proj"], r=3, alpha=6)
    perturb(model)
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        plain = layer.adapter(x, layer.base_layer(x))
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)
