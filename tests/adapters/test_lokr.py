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
