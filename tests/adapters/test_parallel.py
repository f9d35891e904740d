"""Parallel adapter (spec peft.md §16): from the sublayer input, added to its output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splice.adapters import adapter_layers, inject, remove_adapters, trainable_parameters
from splice.adapters.parallel import Bottleneck, ParallelConfig

from ._tiny_hf import batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"parallel": {"r": 3, "sublayer": "site"}}


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
@pytest.mark.parametrize("sublayer", ["ffn", "attn", "both"])
def test_up_zero_is_the_identity(make, sublayer):
    model, x = make(), batch()
    y0 = output(model, x)
    inject(model, "parallel", ".*", r=4, sublayer=sublayer)
    for layer in adapter_layers(model).values():  # Down random (lora init), Up = 0
        assert layer.adapter.bottleneck.down.abs().sum() > 0
        assert layer.adapter.bottleneck.up.abs().sum() == 0
    assert torch.equal(output(model, x), y0)


def _perturbed(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize(("make", "src", "dst"), [
    (tiny_bert, "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"),
    (tiny_llama, "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"),
])  # fmt: skip
def test_ffn_adapter_reads_the_ffn_input_and_adds_to_its_output(make, src, dst):
    """Δ = s·Up(ReLU(Down(h_in) + b_d)) + s·b_u, computed here from the captured FFN input."""
    model, x = make(), batch()
    inject(model, "parallel", ".*", r=4, scale=1.5)
    _perturbed(model)
    seen = {}
    adapted = model.get_submodule(dst)
    model.get_submodule(src).register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    adapted.base_layer.register_forward_hook(lambda m, a, y: seen.update(base=y))
    adapted.register_forward_hook(lambda m, a, y: seen.update(out=y))
    output(model, x)
    b = adapted.adapter.bottleneck
    delta = 1.5 * F.linear(F.relu(F.linear(seen["h"], b.down, b.down_bias)), b.up, b.up_bias)
    assert torch.allclose(seen["out"], seen["base"] + delta, atol=1e-6)


def test_parameter_count_is_2dr_plus_r_plus_d():
    model = tiny_bert()
    inject(model, "parallel", ".*", r=4)  # FFN of 2 layers, d = 16
    assert trainable_parameters(model).trainable == 2 * (2 * 16 * 4 + 4 + 16)


def test_learned_scale_trains_and_removal_drops_the_input_taps():
    model, x = tiny_bert(), batch()
    y0 = output(model, x)
    inject(model, "parallel", ".*", r=4, learn_scale=True, init="bert")
    scales = [lay.adapter.bottleneck.scale for lay in adapter_layers(model).values()]
    assert all(s.requires_grad for s in scales)
    assert not torch.equal(output(model, x), y0)  # bert init: Up ≠ 0
    remove_adapters(model, merge=False)
    assert not adapter_layers(model)
    assert torch.equal(output(model, x), y0)  # no tap hook is left behind to fail


def test_bottleneck_weights_can_be_overridden():
    """Other methods (1-bit adapters) build on Bottleneck by transforming its weights."""

    class Signs(Bottleneck):
        def weights(self):
            return self.down.sign(), self.up.sign()

    b = Signs(5, 6, ParallelConfig(r=2, init="bert"))
    x = torch.randn(3, 5)
    ref = F.linear(F.relu(F.linear(x, b.down.sign(), b.down_bias)), b.up.sign(), b.up_bias)
    assert torch.allclose(b(x), ref)


def test_unknown_block_layout_is_an_error_naming_the_way_out():
    from splice.errors import SpliceError

    from .conftest import make_model

    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match="sublayer='site'"):
        inject(model, "parallel", ["proj"])


def test_peft_format_is_refused_naming_the_method(tmp_path):
    from splice.adapters import save_adapter
    from splice.errors import SpliceError

    model = tiny_bert()
    inject(model, "parallel", ".*", r=4)
    with pytest.raises(SpliceError, match="parallel has no PEFT adapter format"):
        save_adapter(model, tmp_path / "a", format="peft")
    assert not (tmp_path / "a").exists()
