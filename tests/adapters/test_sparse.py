"""Sparse delta (spec §22.2 P5, SPT's unstructured part §10): gradients only at the chosen
entries, no dense-size tensor in forward or backward, Conv1D layout, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from splice.adapters import adapter_deltas, adapter_layers, inject, load_adapter, save_adapter
from splice.adapters.sparse import set_entries
from splice.errors import SpliceError

from .conftest import make_model, perturb

SITES = [f"layers.{i}.proj" for i in range(3)]
CONTRACT_CASES = {  # two sparse sites and one LoRA site (SPT's mixed allocation)
    "sparse": dict(entries={SITES[0]: 5, SITES[1]: 96}, lowrank=[SITES[2]], r=2),
}


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an op produces (views of
    existing tensors, e.g. the frozen weight's transpose, allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        aliased = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in aliased:
                self.largest = max(self.largest, t.numel())
        return out


def _one_layer(d_in: int, d_out: int, n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    inject(model, "sparse", ["0"], entries={"0": n})
    adapter = model[0].adapter
    idx = torch.randperm(d_in * d_out)[:n]
    set_entries(adapter, idx)
    return model, adapter, idx


def test_gradient_equals_the_dense_gradient_at_the_chosen_entries_only():
    model, adapter, idx = _one_layer(16, 12, 20)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        adapter.values.normal_()
    model(x).pow(2).sum().backward()
    w = nn.Parameter(model[0].base_layer.weight.detach() + adapter.delta().materialize())
    dense = nn.functional.linear(x, w, model[0].base_layer.bias)
    (gw,) = torch.autograd.grad(dense.pow(2).sum(), w)
    assert torch.allclose(adapter.values.grad, gw.reshape(-1)[idx], atol=1e-4)
    assert model[0].base_layer.weight.grad is None  # the base weight gets no gradient at all


def test_no_dense_size_tensor_in_forward_or_backward():
    d_in, d_out, tokens = 512, 1024, 4
    model, adapter, _ = _one_layer(d_in, d_out, 3000)
    x = torch.randn(tokens, d_in, requires_grad=True)
    with LargestTensor() as probe:
        model(x).sum().backward()
    assert adapter.values.grad.abs().sum() > 0
    assert probe.largest < d_in * d_out // 16  # outputs: tokens × d_out; entries: 3000
    with LargestTensor() as dense_probe:  # the detector sees a dense dW where there is one
        w = nn.Parameter(torch.zeros(d_out, d_in))
        nn.functional.linear(x, w).sum().backward()
    assert dense_probe.largest >= d_in * d_out


def test_conv1d_delta_is_in_the_stored_layout():
    model, x = make_model("conv1d_gpt2")
    inject(model, "sparse", ["proj"], entries=dict.fromkeys(SITES, 7))
    for layer in adapter_layers(model).values():
        set_entries(layer.adapter, torch.randperm(96)[:7], torch.randn(7))
    with torch.no_grad():
        y = model(x)
        for name, layer in adapter_layers(model).items():
            layer.base_layer.weight += adapter_deltas(model)[f"{name}.weight"].materialize()
            layer.adapter.values.zero_()
        assert torch.allclose(model(x), y, atol=1e-5)


def test_save_load_reproduces_indices_and_outputs(tmp_path):
    model, x = make_model("linear")
    inject(model, "sparse", ["proj"], **CONTRACT_CASES["sparse"])
    set_entries(adapter_layers(model)[SITES[0]].adapter, torch.tensor([95, 3, 40, 41, 7]))
    perturb(model)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "a")
    again, _ = make_model("linear")
    load_adapter(again, tmp_path / "a")
    assert adapter_layers(again)[SITES[0]].adapter.indices.tolist() == [95, 3, 40, 41, 7]
    with torch.no_grad():
        assert torch.equal(again(x), y)


def test_bad_entries_are_refused():
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match="neither sparse entries nor a LoRA"):
        inject(model, "sparse", ["proj"], entries={SITES[0]: 2})
    model, _ = make_model("linear")
    with pytest.raises(SpliceError, match=r"97 sparse entries do not fit a 12×8 weight"):
        inject(model, "sparse", ["proj"], entries=dict.fromkeys(SITES, 97))
    _, adapter, _ = _one_layer(4, 3, 2)
    with pytest.raises(SpliceError, match=r"out of range 0\.\.11"):
        set_entries(adapter, torch.tensor([0, 12]))


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model, _ = make_model("linear")
    inject(model, "sparse", ["proj"], **CONTRACT_CASES["sparse"])
    with pytest.raises(SpliceError, match="sparse's ΔW is not low-rank"):
        save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
