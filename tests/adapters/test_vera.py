"""VeRA specifics: one shared random pair, regenerated from the seed, sliced per layer."""

from __future__ import annotations

import math

import torch

from splice.adapters import adapter_layers, inject, save_adapter
from splice.adapters._primitives import seeded_kaiming

from .conftest import make_model, perturb

CONTRACT_CASES = {"vera": dict(r=4, dropout=0.1)}  # for test_contract.py


def test_shared_pair_is_drawn_like_peft_and_never_stored(tmp_path):
    g = torch.Generator().manual_seed(7)
    a = torch.empty(4, 8).uniform_(-math.sqrt(6 / 8), math.sqrt(6 / 8), generator=g)
    b = torch.empty(12, 4).uniform_(-math.sqrt(6 / 4), math.sqrt(6 / 4), generator=g)
    got_a, got_b = seeded_kaiming(7, ((4, 8), (12, 4)))
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    model, _ = make_model("linear")
    inject(model, "vera", ["proj"], r=4, seed=7)
    layers = list(adapter_layers(model).values())
    assert all(torch.equal(layer.adapter.shared()[0], a) for layer in layers)
    save_adapter(model, tmp_path / "v")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "v" / "splice_adapter.safetensors"))
    assert sum(t.numel() for t in stored.values()) == 3 * (12 + 4)  # λ_b and λ_d only


def test_delta_is_the_scaled_shared_pair():
    model, _ = make_model("linear")
    inject(model, "vera", ["proj"], r=4)
    perturb(model)
    a = model.layers[1]["proj"].adapter
    A, B = a.shared()
    expected = torch.diag(a.vera_lambda_b) @ B @ torch.diag(a.vera_lambda_d) @ A
    assert torch.allclose(a.delta().materialize(), expected.detach(), atol=1e-6)
