"""IA³ specifics: output scaling takes the bias along, feed-forward scaling acts on the input."""

from __future__ import annotations

import pytest
import torch

from splice.adapters import adapter_deltas, inject, merge_adapters, trainable_parameters
from splice.errors import SpliceError

from .conftest import make_model, perturb

CONTRACT_CASES = {  # for test_contract.py: output scaling, and input scaling on every layer
    "ia3": dict(),
    "ia3_ff": dict(feedforward=["proj"]),
}


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv3x3"])
@pytest.mark.parametrize("ff", [False, True])
def test_scales_equal_the_definition(kind, ff):
    model, x = make_model(kind)
    layer0 = model.layers[0]["proj"]
    base = {n: p.detach().clone() for n, p in layer0.named_parameters()}
    inject(model, "ia3", ["proj"], feedforward=["proj"] if ff else [])
    perturb(model)
    layer = model.layers[0]["proj"]
    l = layer.adapter.ia3_l.detach()  # noqa: E741
    with torch.no_grad():
        got = layer(x)
        if ff:
            shape = (-1, 1, 1) if kind.startswith("conv3") else (-1,)
            expected = layer.base_layer(x * l.reshape(shape))
        else:
            y = layer.base_layer(x)
            expected = y * (l.reshape(-1, 1, 1) if kind.startswith("conv3") else l)
    assert torch.allclose(got, expected, atol=1e-6)
    deltas = adapter_deltas(model)
    assert ("layers.0.proj.bias" in deltas) is not ff  # Δb only when outputs are scaled
    if not ff:
        assert torch.allclose(deltas["layers.0.proj.bias"].materialize(), base["bias"] * (l - 1))


def test_feedforward_must_be_adapted_and_count_follows_the_side():
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match="feedforward module 'nope'"):
        inject(model, "ia3", ["proj"], feedforward=["nope"])
    inject(model, "ia3", ["proj"], feedforward=["proj"])
    assert trainable_parameters(model).trainable == 3 * 8  # d_in per FF layer
    merge_adapters(model)


@pytest.mark.parametrize("transposed", [False, True])  # True: g arrives non-contiguous
@pytest.mark.parametrize("inputs", [True, False])
def test_fused_linear_backward_matches_autograd(inputs, transposed):
    from splice.adapters.ia3 import _ScaledLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    v = 1 + 0.3 * torch.randn(6 if inputs else 4, dtype=torch.float64, generator=g)
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, v: _ScaledLinear.apply(x, v, w, b, inputs), (x, v))
    ref = torch.nn.functional.linear(x * v, w, b) if inputs else (x @ w.t() + b) * v
    up = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    if transposed:  # the gradient of a transposed view (attention's keys and values)
        up = up.transpose(0, 1).contiguous().transpose(0, 1)
    want = torch.autograd.grad((ref * up).sum(), (x, v))
    y = _ScaledLinear.apply(x, v, w, b, inputs)
    grads = []
    y.register_hook(lambda t: grads.append(t.is_contiguous()))
    got = torch.autograd.grad((y * up).sum(), (x, v))
    assert grads == [not transposed]
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c)


def test_a_trainable_base_linear_takes_the_unfused_path_and_gets_its_gradient():
    model, x = make_model("linear")
    inject(model, "ia3", ["proj"], feedforward=["proj"])
    layer = model.layers[0]["proj"]
    layer.base_layer.weight.requires_grad_(True)  # e.g. modules_to_save / full fine-tuning
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.adapter.ia3_l.grad is not None
