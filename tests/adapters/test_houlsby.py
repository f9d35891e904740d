"""Serial (Houlsby) adapter: h + Up(ReLU(Down(h))) on a sublayer's output (spec peft.md §16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.adapters import adapter_layers, inject, trainable_parameters

from ._tiny_hf import batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"houlsby": {"r": 3, "sublayer": "site"}}


def test_after_attention_and_ffn_of_every_layer_identity_at_init():
    for make, outs in ((tiny_bert, ("attention.output.dense", "output.dense")),
                       (tiny_llama, ("o_proj", "down_proj"))):  # fmt: skip
        model, x = make(), batch()
        y0 = output(model, x)
        inject(model, "houlsby", ".*", r=4)
        names = sorted(adapter_layers(model))
        assert len(names) == 4 and all(n.endswith(outs) for n in names)
        assert torch.equal(output(model, x), y0)


def test_adapter_reads_the_sublayer_output():
    model, x = tiny_bert(), batch()
    inject(model, "houlsby", ".*", r=4, sublayer="ffn", init="bert")
    assert trainable_parameters(model).trainable == 2 * (2 * 16 * 4 + 4 + 16)
    layer = model.get_submodule("encoder.layer.0.output.dense")
    seen = {}
    layer.base_layer.register_forward_hook(lambda m, a, y: seen.update(h=y))
    layer.register_forward_hook(lambda m, a, y: seen.update(out=y))
    output(model, x)
    b = layer.adapter.bottleneck
    ref = seen["h"] + F.linear(F.relu(F.linear(seen["h"], b.down, b.down_bias)), b.up, b.up_bias)
    assert torch.allclose(seen["out"], ref, atol=1e-6)
