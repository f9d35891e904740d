"""Prefix tuning without the MLP: P_k, P_v learned directly, 2·l·kv per layer (spec §16)."""

from __future__ import annotations

import torch

from splice.adapters import adapter_layers, inject, trainable_parameters

from ._tiny_hf import batch, output, tiny_llama

CONTRACT_CASES = {"prefix_nomlp": {"tokens": 3}}


def test_gqa_prefix_has_the_key_value_width_and_trains():
    model, x = tiny_llama(), batch()  # 2 of 4 heads carry keys/values: kv = 2 × 4 = 8
    inject(model, "prefix_nomlp", ".*", tokens=3)
    assert trainable_parameters(model).trainable == 2 * (2 * 3 * 8)
    adapters = [lay.adapter for lay in adapter_layers(model).values()]
    assert all(a.keys.shape == (3, 8) for a in adapters)
    y0 = output(model, x)
    model(**x).logits.square().mean().backward()
    assert all(a.keys.grad.abs().sum() > 0 and a.values.grad.abs().sum() > 0 for a in adapters)
    with torch.no_grad():
        adapters[1].values.add_(1.0)
    assert not torch.allclose(output(model, x), y0)  # the last layer's prefix reaches the logits
