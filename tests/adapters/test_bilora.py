"""Bi-LoRA and the normal-codebook quantiser (spec peft.md §14, §22.6)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import optimize, stats

from splice.adapters import adapter_layers, inject, load_adapter, save_adapter
from splice.adapters._bits import (
    normal_codebook,
    pack_codes,
    quantize_ste,
    unpack_codes,
)
from splice.errors import SpliceError

from .conftest import make_model, perturb

CONTRACT_CASES = {"bilora": {"r": 2}, "bilora-b2": {"r": 2, "bits": 2}}


def test_one_bit_levels_and_threshold():
    levels, thresholds = normal_codebook(1)
    q = stats.norm.ppf(0.75)
    assert torch.allclose(levels, torch.tensor([-q, q], dtype=torch.float32))
    assert abs(q - 0.6745) < 1e-4
    assert torch.equal(thresholds, torch.zeros(1))


def test_two_bit_codebook_is_the_closed_form_fixed_point():
    """Levels ±a, ±c with a = Φ⁻¹((½ + Φ(t))/2), c = Φ⁻¹((Φ(t) + 1)/2), t = (a + c)/2:
    solved here for t by a root finder, independently of the library's iteration."""

    def inner_outer(t):
        return stats.norm.ppf((0.5 + stats.norm.cdf(t)) / 2), stats.norm.ppf(
            (stats.norm.cdf(t) + 1) / 2
        )

    t = optimize.brentq(lambda t: sum(inner_outer(t)) / 2 - t, 0.1, 3.0, xtol=1e-12)
    a, c = inner_outer(t)
    levels, thresholds = normal_codebook(2)
    assert torch.allclose(levels, torch.tensor([-c, -a, a, c], dtype=torch.float32), atol=1e-5)
    assert torch.allclose(thresholds, torch.tensor([-t, 0.0, t], dtype=torch.float32), atol=1e-5)


def test_quantiser_standardises_and_passes_gradients_straight_through():
    w = torch.randn(6, 7, requires_grad=True)
    wq, codes, mu, sigma = quantize_ste(w, 1)
    z = (w.detach() - w.detach().mean()) / (w.detach().std() + 1e-5)
    level = stats.norm.ppf(0.75)
    expected = torch.where(z > 0, level, -level).float() * sigma.detach() + mu.detach()
    assert torch.allclose(wq.detach(), expected)
    assert torch.equal(codes, (z > 0).to(torch.uint8))
    wq.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (37,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


def test_up_is_nonzero_and_truncated():
    model, _ = make_model("linear")
    inject(model, "bilora", ["proj"], r=4)
    for layer in adapter_layers(model).values():
        up = layer.adapter.lora_B
        assert (up != 0).all() and up.abs().max() <= 2e-3


def test_saved_file_is_packed_and_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))
    x = torch.randn(5, 64)
    inject(model, "bilora", ["0", "2"], r=8)
    perturb(model)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "splice_adapter.safetensors"))
    entries = 8 * (64 + 96) + 8 * (96 + 32)
    assert len(tensors) == 2 and all(t.dtype == torch.uint8 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == entries // 8 + 4 * 8  # + (μ, σ) each
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 32))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if "adapter" not in k})  # fmt: skip
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    save_adapter(fresh, tmp_path / "b")  # a loaded adapter saves the same codes
    again = load_file(str(tmp_path / "b" / "splice_adapter.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_wrong_codebook_size_names_the_file_and_module(tmp_path):
    model, _ = make_model("linear")
    inject(model, "bilora", ["proj"], r=4)
    save_adapter(model, tmp_path / "a")
    cfg = tmp_path / "a" / "splice_adapter.json"
    info = json.loads(cfg.read_text())
    info["config"]["bits"] = 2
    cfg.write_text(json.dumps(info))
    fresh, _ = make_model("linear")
    with pytest.raises(
        SpliceError, match=r"layers\.0\.proj: the file holds 26 bytes; a 4-level codebook"
    ) as e:
        load_adapter(fresh, tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value)


def test_bi_head_uses_the_quantised_head_weight_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x = torch.randn(7, 16)
    w0, b0 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    inject(model, "bilora", ["0", "2"], r=2, head=["2"])
    head = adapter_layers(model)["2"].adapter
    assert torch.equal(head.weight, w0)  # the latent head starts at W₀
    h = model[1](model[0](x))
    with torch.no_grad():
        z = (w0 - w0.mean()) / (w0.std() + 1e-5)
        level = stats.norm.ppf(0.75)
        wq = torch.where(z > 0, level, -level).float() * w0.std() + w0.mean()
        assert torch.allclose(model[2](h), h @ wq.t() + b0, atol=1e-5)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * (16 + 16) + 16 * 5
    perturb(model)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "splice_adapter.safetensors"))
    assert saved["2.adapter.packed"].numel() == 16 * 5 // 8 + 8  # 1 bit per weight, μ, σ
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
        layer = adapter_layers(fresh)["2"]
        layer.merge()  # ΔW = Q(W) − W₀: the merged weight is the 1-bit head
        assert len(torch.unique(layer.weight)) == 2
