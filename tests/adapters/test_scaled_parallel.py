"""Scaled parallel adapter: the parallel adapter with s = 4 (spec peft.md §16)."""

from __future__ import annotations

import copy

import torch

from splice.adapters import adapter_layers, inject

from ._tiny_hf import batch, tiny_bert

CONTRACT_CASES = {"scaled_parallel": {"r": 3, "sublayer": "site"}}


def test_scale_multiplies_the_adapter_output():
    """Same weights: the FFN output moves 4× as far as with s = 1 (one layer, so exact)."""
    model, x = tiny_bert(layers=1), batch()
    seen = {}
    runs = {}
    for name, method in (("s1", "parallel"), ("s4", "scaled_parallel")):
        m = copy.deepcopy(model)
        torch.manual_seed(5)
        inject(m, method, ".*", r=4, init="bert")
        (layer,) = adapter_layers(m).values()
        layer.base_layer.register_forward_hook(lambda mod, a, y: seen.update(base=y))
        layer.register_forward_hook(lambda mod, a, y: seen.update(out=y))
        with torch.no_grad():
            m(**x)
        runs[name] = seen["out"] - seen["base"]
    assert runs["s1"].abs().max() > 0
    assert torch.allclose(runs["s4"], 4 * runs["s1"], atol=1e-6)
