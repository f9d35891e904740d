"""LoKr specifics: peft's factorization rule and factor shapes, the Kronecker forward."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.adapters import adapter_deltas, inject
from splice.adapters.lokr import factorization

from .conftest import make_model, perturb

CONTRACT_CASES = {  # for test_contract.py: full W2, and both factors low-rank
    "lokr": dict(r=4, alpha=4),
    "lokr_both": dict(r=1, alpha=2, decompose_both=True, decompose_factor=2),
}


@pytest.mark.parametrize(
    ("n", "factor", "expected"),
    [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)),
     (384, -1, (16, 24)), (12, 5, (3, 4))],
)  # fmt: skip
def test_factorization_matches_peft_examples(n, factor, expected):
    assert factorization(n, factor) == expected


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv3x3"])
def test_forward_equals_the_kronecker_delta(kind):
    model, x = make_model(kind)
    inject(model, "lokr", ["proj"], r=1, alpha=3, decompose_both=True, decompose_factor=2)
    perturb(model)
    layer = model.layers[0]["proj"]
    w1, w2 = layer.adapter.kron_factors()
    dw = layer.adapter.site.stored(torch.kron(w1, w2) * 3.0).detach()
    assert torch.allclose(adapter_deltas(model)["layers.0.proj.weight"].materialize(), dw)
    shifted = copy.deepcopy(layer.base_layer)  # the base layer with W + ΔW
    with torch.no_grad():
        shifted.weight.add_(dw)
        assert torch.allclose(layer(x), shifted(x), atol=1e-5)


def test_backward_matches_the_dense_kronecker_form_and_keeps_no_product():
    from splice.adapters.lokr import _KronApply

    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w1 = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _KronApply.apply(*t, 0.7), (y, x, w1, w2))
    # against y + s·(W1 ⊗ W2)·vec(X) with autograd's own backward
    up = torch.randn(5, 2 * 6, dtype=torch.float64, generator=g)
    dense = ((y.reshape(5, 12) + 0.7 * x.reshape(5, 12) @ torch.kron(w1, w2).t()) * up).sum()
    want = torch.autograd.grad(dense, (y, x, w1, w2))
    out = (_KronApply.apply(y, x, w1, w2, 0.7).reshape(5, 12) * up).sum()
    for a, b in zip(torch.autograd.grad(out, (y, x, w1, w2)), want, strict=True):
        torch.testing.assert_close(a, b)
    # what the forward keeps for the backward: X and the factors, not W1·X
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _KronApply.apply(y, x, w1, w2, 0.7)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), w1.numel(), w2.numel()])


def test_trains_under_cpu_autocast_with_the_fp32_gradients():
    """The fused backward runs without autocast: it recomputes W1·X in the forward's bf16."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, 12))
    inject(model, "lokr", ["0", "2"], r=2, alpha=4)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 24)
    want = torch.autograd.grad(model(x).sum(), trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    got = torch.autograd.grad(out.float().sum(), trained)
    assert out.dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
