"""SAPPA = serial + parallel adapter at the FFN + prefix at attention, on the kept layers
(AutoPEFT's space, spec peft.md §15/§16), composed from houlsby, parallel and prefix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from splice.adapters import (
    adapter_layers,
    inject,
    load_adapter,
    remove_adapters,
    save_adapter,
    trainable_parameters,
)
from splice.adapters.prefix import PrefixAdapter
from splice.adapters.sappa import SerialParallelAdapter
from splice.errors import SpliceError

from ._tiny_hf import batch, output, tiny_bert, tiny_llama

CONTRACT_CASES = {"sappa": {"serial": 3, "parallel": 2, "prefix": 2}}


def _hidden(model, x, **kw):
    with torch.no_grad():
        out = model(**x, output_hidden_states=True, **kw)
    return out.hidden_states


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_a_left_out_layer_sees_no_prefix(make):
    """Prefix on layer 1 only: layer 0's output is the base model's (positions start at l)."""
    base, x, n = make(), batch(), 3
    model = copy.deepcopy(base)
    inject(model, "sappa", ".*", prefix=n, layers=[1])
    wrapped = list(adapter_layers(model))
    assert wrapped and all(".1." in k for k in wrapped)  # only layer 1 is wrapped
    positions = torch.arange(n, n + x["input_ids"].shape[1]).expand(3, -1)
    got, want = _hidden(model, x)[1], _hidden(base, x, position_ids=positions)[1]
    keep = x["attention_mask"].bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5)
    assert not torch.allclose(_hidden(model, x)[2][keep], _hidden(base, x)[2][keep], atol=1e-3)


def test_prefix_on_every_layer_equals_prefix_nomlp():
    base, x = tiny_bert(), batch()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, "sappa", ".*", prefix=3)
    inject(theirs, "prefix_nomlp", ".*", tokens=3)
    mine = {n: lay.adapter for n, lay in adapter_layers(ours).items()}
    with torch.no_grad():
        for n, lay in adapter_layers(theirs).items():
            lay.adapter.keys.copy_(mine[n].keys)
            lay.adapter.values.copy_(mine[n].values)
    assert torch.equal(output(ours, x), output(theirs, x))


def test_serial_reads_the_ffn_output_plus_the_parallel_adapter():
    model, x = tiny_bert(), batch()
    inject(model, "sappa", ".*", serial=3, parallel=4, scale=2.0, layers=[0])
    layer = adapter_layers(model)["encoder.layer.0.output.dense"]
    adapter = layer.adapter
    assert isinstance(adapter, SerialParallelAdapter)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    seen = {}
    model.get_submodule("encoder.layer.0.intermediate.dense").register_forward_pre_hook(
        lambda m, a: seen.update(h=a[0])
    )
    layer.base_layer.register_forward_hook(lambda m, a, y: seen.update(base=y))
    layer.register_forward_hook(lambda m, a, y: seen.update(out=y))
    output(model, x)
    p, s = adapter.parallel.bottleneck, adapter.serial.bottleneck
    y = seen["base"] + 2.0 * F.linear(F.relu(F.linear(seen["h"], p.down, p.down_bias)), p.up,
                                      p.up_bias)  # fmt: skip
    y = y + F.linear(F.relu(F.linear(y, s.down, s.down_bias)), s.up, s.up_bias)
    assert torch.allclose(seen["out"], y, atol=1e-5)


@pytest.mark.parametrize(
    ("sizes", "layers"),
    [({"serial": 3}, [0]), ({"parallel": 4, "prefix": 2}, [1]), ({"serial": 2, "parallel": 5,
     "prefix": 1}, None)],
)  # fmt: skip
def test_modules_and_count_follow_the_configuration(sizes, layers):
    model = tiny_bert(layers=3)
    inject(model, "sappa", ".*", layers=layers, **sizes)
    kept = [0, 1, 2] if layers is None else layers
    names = sorted(adapter_layers(model))
    want = []
    for i in kept:
        if sizes.get("prefix"):
            want.append(f"encoder.layer.{i}.attention.self")
        if sizes.get("serial") or sizes.get("parallel"):
            want.append(f"encoder.layer.{i}.output.dense")
    assert names == sorted(want)
    d = 16
    per_layer = 2 * sizes.get("prefix", 0) * d
    for k in ("serial", "parallel"):
        if sizes.get(k):
            per_layer += 2 * d * sizes[k] + sizes[k] + d
    assert trainable_parameters(model).trainable == len(kept) * per_layer
    n_prefix = sum(isinstance(a.adapter, PrefixAdapter) for a in adapter_layers(model).values())
    assert n_prefix == (len(kept) if sizes.get("prefix") else 0)


def test_all_sizes_zero_is_refused_and_nothing_is_wrapped():
    model = tiny_bert()
    with pytest.raises(SpliceError, match="serial=parallel=prefix=0 adapts nothing"):
        inject(model, "sappa", ".*")
    assert not adapter_layers(model)


def test_save_load_with_left_out_layers_reproduces_outputs(tmp_path):
    base, x = tiny_bert(layers=3), batch()
    model = copy.deepcopy(base)
    inject(model, "sappa", ".*", serial=2, parallel=3, prefix=2, layers=[0, 2])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    y = output(model, x)
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(7)
    again = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(output(again, x), y)
    remove_adapters(again, merge=False)
    assert torch.equal(output(again, x), output(base, x))  # hooks and masks gone
