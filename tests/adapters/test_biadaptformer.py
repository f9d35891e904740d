"""Bi-AdaptFormer (spec peft.md §14): the 1-bit parallel adapter at the FFN."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import stats

from splice.adapters import adapter_layers, inject, load_adapter, save_adapter
from splice.adapters import trainable_parameters as count
from splice.adapters.biadaptformer import BiAdaptFormerConfig, BinaryBottleneck
from splice.errors import SpliceError

from ._tiny_hf import batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {
    "biadaptformer": {"r": 3, "sublayer": "site", "dropout": 0.0},
    "biadaptformer-b2": {"r": 3, "sublayer": "site", "bits": 2, "dropout": 0.0},
}
FFN = ("encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense")
LEVEL = float(stats.norm.ppf(0.75))


def one_bit(w: torch.Tensor) -> torch.Tensor:
    """The spec's W_q for b = 1, written out: sign of the standardised W times 0.6745·σ, + μ."""
    z = (w - w.mean()) / (w.std() + 1e-5)
    return torch.where(z > 0, LEVEL, -LEVEL) * w.std() + w.mean()


def ste_one_bit(w: torch.Tensor) -> torch.Tensor:
    """The same, straight-through (the usual z + (Q(z) − z).detach() form)."""
    mu, sigma = w.mean(), w.std()
    z = (w - mu) / (sigma + 1e-5)
    q = z + (torch.where(z > 0, LEVEL, -LEVEL) - z).detach()
    return q * sigma + mu


def test_forward_is_the_binary_bottleneck_of_the_ffn_input_without_biases():
    model, x = tiny_bert(), batch()
    inject(model, "biadaptformer", ".*", r=4, scale=0.5, dropout=0.0)
    adapted = model.get_submodule(FFN[1])
    b = adapted.adapter.bottleneck
    assert b.down_bias is None and b.up_bias is None
    with torch.no_grad():
        b.up.normal_(0, 0.3)
    seen = {}
    model.get_submodule(FFN[0]).register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    adapted.base_layer.register_forward_hook(lambda m, a, y: seen.update(base=y))
    adapted.register_forward_hook(lambda m, a, y: seen.update(out=y))
    output(model, x)
    with torch.no_grad():
        down, up = one_bit(b.down), one_bit(b.up)
        assert len(torch.unique(down)) == 2 and len(torch.unique(up)) == 2
        delta = 0.5 * F.relu(seen["h"] @ down.T) @ up.T
    assert torch.allclose(seen["out"], seen["base"] + delta, atol=1e-6)


def test_gradients_pass_straight_through_to_the_latent_matrices():
    torch.manual_seed(0)
    cfg = BiAdaptFormerConfig(r=4, scale=0.7, dropout=0.0)
    b = BinaryBottleneck(6, 5, cfg)
    with torch.no_grad():
        b.up.normal_(0, 0.3)
    x, g = torch.randn(3, 6), torch.randn(3, 5)
    (b(x) * g).sum().backward()
    down, up = (p.detach().clone().requires_grad_() for p in (b.down, b.up))
    (0.7 * F.relu(x @ ste_one_bit(down).T) @ ste_one_bit(up).T * g).sum().backward()
    assert b.down.grad.abs().sum() > 0 and b.up.grad.abs().sum() > 0
    assert torch.allclose(b.down.grad, down.grad, atol=1e-6)
    assert torch.allclose(b.up.grad, up.grad, atol=1e-6)


def test_up_is_small_nonzero_so_init_is_near_not_equal_to_the_base():
    model, x = tiny_bert(), batch()
    y0 = output(model, x)
    inject(model, "biadaptformer", ".*", r=4)
    for layer in adapter_layers(model).values():
        up = layer.adapter.bottleneck.up
        assert (up != 0).all() and up.abs().max() <= 2e-3
    gap = (output(model, x) - y0).abs().max()
    assert 0 < gap < 0.05  # the spec: Up ≠ 0 (σ divides), so not the identity


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_parameter_count_is_2dr_per_ffn(make):
    model = make()
    inject(model, "biadaptformer", ".*", r=4)  # FFN of 2 layers, d = 16, no biases
    assert count(model).trainable == 2 * (2 * 16 * 4)


@pytest.mark.parametrize("bits", [1, 2])
def test_packed_file_round_trips_bit_exactly_at_b_bits_per_entry(bits, tmp_path):
    model, x = tiny_bert(), batch()
    inject(model, "biadaptformer", ".*", r=8, bits=bits, learn_scale=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    y = output(model, x)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "splice_adapter.safetensors"))
    packed = {k: t for k, t in tensors.items() if k.endswith(".packed")}
    assert len(packed) == 2 and all(t.dtype == torch.uint8 for t in packed.values())
    # Down (8, 16) and Up (16, 8) per FFN at b bits, then (μ, σ) of each; the scales as floats
    assert all(t.numel() == 2 * 8 * 16 * bits // 8 + 16 for t in packed.values())
    assert sorted(k for k in tensors if k not in packed) == [
        f"encoder.layer.{i}.output.dense.adapter.scale" for i in (0, 1)
    ]
    on_disk = (tmp_path / "a" / "splice_adapter.safetensors").stat().st_size
    assert on_disk < 2 * (2 * 8 * 16 * bits // 8 + 16 + 4) + 1024  # + the header
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(output(fresh, x), y)
    save_adapter(fresh, tmp_path / "b")  # a loaded adapter saves the same codes
    again = load_file(str(tmp_path / "b" / "splice_adapter.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_loaded_matrices_are_the_expanded_codes():
    model = tiny_bert()
    inject(model, "biadaptformer", ".*", r=4)
    b = model.get_submodule(FFN[1]).adapter.bottleneck
    assert isinstance(b, BinaryBottleneck)
    want = one_bit(b.up.detach())
    fresh = tiny_bert()
    saved = b.saved_tensors()
    inject(fresh, "biadaptformer", ".*", r=4)
    loaded = fresh.get_submodule(FFN[1]).adapter.bottleneck
    loaded.load_saved(saved, "mem")
    assert torch.allclose(loaded.up, want, atol=1e-7) and len(torch.unique(loaded.up)) == 2


def test_wrong_codebook_size_names_the_file_and_module(tmp_path):
    model = tiny_bert()
    inject(model, "biadaptformer", ".*", r=4)
    save_adapter(model, tmp_path / "a")
    cfg = tmp_path / "a" / "splice_adapter.json"
    info = json.loads(cfg.read_text())
    info["config"]["bits"] = 2
    cfg.write_text(json.dumps(info))
    with pytest.raises(
        SpliceError, match=r"output\.dense: the file holds 32 bytes; a 4-level codebook"
    ) as e:
        load_adapter(tiny_bert(), tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value)
