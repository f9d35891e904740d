"""MAM adapter = prefix at attention + scaled parallel adapter at the FFN (spec peft.md §16)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from splice.adapters import adapter_layers, inject, trainable_parameters
from splice.adapters.parallel import ParallelAdapter
from splice.adapters.prefix import PrefixAdapter

from ._tiny_hf import batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"mam": {"tokens": 3, "hidden": 8, "r": 3}}


def _split(model):
    layers = adapter_layers(model)
    prefix = {n: lay.adapter for n, lay in layers.items() if isinstance(lay.adapter, PrefixAdapter)}
    pa = {n: lay.adapter for n, lay in layers.items() if isinstance(lay.adapter, ParallelAdapter)}
    return prefix, pa


@pytest.mark.parametrize(("make", "ffn_in"), [(tiny_bert, "intermediate.dense"),
                                              (tiny_llama, "mlp.gate_proj")])  # fmt: skip
def test_mam_outputs_are_the_prefix_model_plus_the_scaled_ffn_adapter(make, ffn_in):
    base, x = make(), batch()
    mam, pre = copy.deepcopy(base), copy.deepcopy(base)
    inject(mam, "mam", ".*", tokens=3, r=4, reparam=False)
    inject(pre, "prefix_nomlp", ".*", tokens=3)
    prefix, pa = _split(mam)
    assert len(prefix) == 2 and len(pa) == 2
    with torch.no_grad():  # the same prefixes in both models
        for a, b in zip(_ordered(prefix), _ordered(_split(pre)[0]), strict=True):
            b.keys.copy_(a.keys)
            b.values.copy_(a.values)
    assert torch.equal(output(mam, x), output(pre, x))  # Up = 0: MAM ≡ its prefix part
    with torch.no_grad():
        for a in pa.values():
            a.bottleneck.up.normal_(0, 0.5)
    name, adapter = sorted(pa.items())[-1]
    layer, seen = adapter_layers(mam)[name], {}
    assert adapter.tap is not None  # the FFN input arrives through a tap; capture it too
    block = name.rsplit(".", 2)[0]  # …layer.1.output.dense, …layers.1.mlp.down_proj
    mam.get_submodule(f"{block}.{ffn_in}").register_forward_pre_hook(
        lambda m, a: seen.update(h=a[0])
    )
    layer.base_layer.register_forward_hook(lambda m, a, y: seen.update(base=y))
    layer.register_forward_hook(lambda m, a, y: seen.update(out=y))
    output(mam, x)
    b = adapter.bottleneck
    delta = F.linear(F.relu(F.linear(seen["h"], b.down, b.down_bias)), b.up, b.up_bias)
    assert torch.allclose(seen["out"], seen["base"] + 2.0 * delta, atol=1e-6)  # s = 2


def _ordered(adapters):
    return [a for _, a in sorted(adapters.items())]


def test_parameter_count_is_prefix_plus_parallel():
    model = tiny_bert()
    inject(model, "mam", ".*", tokens=3, r=4, reparam=False)
    prefix = 2 * 3 * 16 * 2  # 2 layers × l × 2 × kv
    parallel = 2 * (2 * 16 * 4 + 4 + 16)
    assert trainable_parameters(model).trainable == prefix + parallel
