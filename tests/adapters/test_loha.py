"""LoHa specifics: the rank-r² factors equal the Hadamard product of the two pairs."""

from __future__ import annotations

import torch

from splice.adapters import adapter_deltas, inject
from splice.adapters.loha import khatri_rao

from .conftest import make_model, perturb

CONTRACT_CASES = {"loha": dict(r=2, alpha=4)}  # for test_contract.py


def test_khatri_rao_factors_multiply_to_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    u1, v1, u2, v2 = (torch.randn(s, generator=g) for s in [(7, 3), (3, 5), (7, 2), (2, 5)])
    u, v = khatri_rao(u1, v1, u2, v2)
    assert u.shape == (7, 6) and v.shape == (6, 5)
    assert torch.allclose(u @ v, (u1 @ v1) * (u2 @ v2), atol=1e-6)


def test_delta_is_the_scaled_hadamard_product_and_w2b_starts_at_zero():
    model, _ = make_model("conv3x3")
    inject(model, "loha", ["proj"], r=3, alpha=6)
    a = model.layers[0]["proj"].adapter
    assert not a.hada_w2_b.any() and a.hada_w1_b.std() > 0
    perturb(model)
    hada = (a.hada_w1_a @ a.hada_w1_b) * (a.hada_w2_a @ a.hada_w2_b) * 2.0
    got = adapter_deltas(model)["layers.0.proj.weight"].materialize()
    assert got.shape == (6, 4, 3, 3)
    assert torch.allclose(got, hada.detach().reshape(6, 4, 3, 3), atol=1e-6)
