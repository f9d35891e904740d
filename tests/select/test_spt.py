"""SPT (spec §10): sensitivity = Σ g², the α/β allocation rules on a hand-built map, the τ′
sweep to a budget, and the applied plan reloading to the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splice.adapters import adapter_layers, load_adapter, save_adapter, trainable_parameters
from splice.errors import SpliceError
from splice.select import spt
from splice.select.run import options

from .conftest import Tiny, data


def test_sensitivity_is_the_sum_of_squared_batch_gradients():
    torch.manual_seed(0)
    model = Tiny()
    x, y = data()
    loss = lambda b: F.cross_entropy(model(x[8 * b : 8 * b + 8]), y[8 * b : 8 * b + 8])  # noqa: E731
    w = model.layers[1]["a"].weight
    sens = spt.sensitivity(loss, {"w": w}, batches=3)
    expected = sum(torch.autograd.grad(loss(b), w)[0].pow(2) for b in range(3))
    assert torch.allclose(sens["w"], expected)
    model.requires_grad_(False)
    spt.sensitivity(loss, {"w": w}, batches=1)
    assert not w.requires_grad


def test_bf16_sensitivity_squares_bfloat16_products_and_rejects_other_precisions():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(64, 5) * 3
    loss = lambda b: lin(x).sum()  # noqa: E731  (∂ℒ/∂W = 1ᵀx for every row of W)
    exact = spt.sensitivity(loss, {"w": lin.weight}, 1)["w"]
    assert torch.allclose(exact, x.sum(0).pow(2).expand(3, 5), rtol=1e-5)
    low = spt.sensitivity(loss, {"w": lin.weight}, 2, precision="bf16")["w"]
    col = x.bfloat16().float().sum(0).bfloat16().float()  # inputs and product in bfloat16
    assert torch.allclose(low, 2 * col.pow(2).expand(3, 5), rtol=2e-2)
    assert not torch.equal(low, 2 * exact) and low.dtype == torch.float32
    with pytest.raises(SpliceError, match="auto, fp32 or bf16"):
        spt.sensitivity(loss, {"w": lin.weight}, 1, precision="fp16")
    with pytest.raises(SpliceError, match="precision"):
        options("spt", {"precision": "fp16"})
    assert options("spt", {"precision": "bf16"}).precision == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_the_device_has_native_bfloat16(native, monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(64, 5) * 3
    loss = lambda b: lin(x).sum()  # noqa: E731
    monkeypatch.setattr(spt, "native_bf16", lambda device: native)
    assert spt.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert spt.resolve_precision("fp32", "cpu") == "fp32"
    auto = spt.sensitivity(loss, {"w": lin.weight}, 2, precision="auto")["w"]
    same = spt.sensitivity(loss, {"w": lin.weight}, 2, precision="bf16" if native else "fp32")
    assert torch.equal(auto, same["w"])
    assert options("spt", {}).precision == "auto"


def test_native_bf16_answers_for_this_machine_and_unknown_devices():
    assert spt.native_bf16("cpu") in (True, False)
    assert spt.native_bf16("meta") is False


def hand_map():
    """M1 (4×5, P_struct 18) holds the 6 largest values, M2 (4×5) 2, vector v (10) 3."""
    m1 = torch.zeros(4, 5)
    m1.view(-1)[[0, 3, 7, 8, 12, 19]] = torch.tensor([100.0, 99, 98, 97, 96, 95])
    m2 = torch.zeros(4, 5)
    m2.view(-1)[[4, 11]] = torch.tensor([90.0, 89])
    v = torch.zeros(10)
    v[[1, 2, 9]] = torch.tensor([80.0, 79, 78])
    return {"m1": m1, "m2": m2, "v": v}, {"m1": 18, "m2": 18}


def test_structured_when_n_reaches_p_struct_over_alpha_else_the_entries():
    sens, cost = hand_map()
    plan = spt.allocate(sens, tau=11, struct_cost=cost, alpha=3.0, beta=5.0)
    # m1: 6 ≥ 18/3 → LoRA; m2: 2 < 6 → its 2 entries; v: 3 ≥ 10/5 → whole vector
    assert plan.lowrank == ["m1"]
    assert plan.entries["m2"].tolist() == [4, 11]
    assert plan.vectors == {"v": None}
    assert plan.total == 18 + 2 + 10
    plan = spt.allocate(sens, tau=7, struct_cost=cost, alpha=3.0, beta=2.0)
    # top 7: m1's 6 and m2's 90; v none. β=2: v would need 5
    assert plan.lowrank == ["m1"] and plan.entries["m2"].tolist() == [4]
    assert plan.vectors == {} and plan.total == 19
    plan = spt.allocate(sens, tau=11, struct_cost=cost, alpha=2.0, beta=2.0)
    # α=2: m1 needs 9 → 6 entries; β=2: v needs 5 → its 3 entries
    assert plan.lowrank == [] and plan.entries["m1"].tolist() == [0, 3, 7, 8, 12, 19]
    assert plan.vectors["v"].tolist() == [1, 2, 9] and plan.total == 11


def test_sweep_keeps_the_tau_whose_total_is_closest_to_the_budget():
    sens, cost = hand_map()
    totals = {t: spt.allocate(sens, t, cost, 3.0, 5.0).total for t in range(1, 31)}
    for budget in (3, 20, 29, 30):
        plan = spt.sweep(sens, budget, cost, 3.0, 5.0, step=1)
        best = min(abs(t - budget) for t in totals.values())
        assert abs(plan.total - budget) == best
        assert plan.tau == min(t for t, tot in totals.items() if abs(tot - budget) == best)


@pytest.mark.parametrize("budget", [0, -3, 51])
def test_budget_outside_the_tunable_entries_is_refused(budget):
    sens, cost = hand_map()
    with pytest.raises(SpliceError, match=rf"budget {budget} is outside 1\.\.50 \(50 tunable"):
        spt.sweep(sens, budget, cost)


def test_selected_plan_trains_and_reloads_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = Tiny(d=8)
    x, y = data(d=8)
    loss = lambda b: F.cross_entropy(model(x[8 * b : 8 * b + 8]), y[8 * b : 8 * b + 8])  # noqa: E731
    plan = spt.select(model, loss, budget=150, batches=4, r=2, alpha=10.0)
    assert plan.lowrank and plan.entries  # this budget mixes both kinds
    assert abs(plan.total - 150) <= 150 // 50 + 2 * 2 * 16  # within one sweep step's jump
    spt.apply(model, plan, r=2, modules_to_save=["head"])
    head = sum(p.numel() for p in model.head.parameters())
    assert trainable_parameters(model).trainable == plan.total + head
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in range(4):
        loss(b).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        out = model(x)
    save_adapter(model, tmp_path / "spt")
    torch.manual_seed(0)
    again = load_adapter(Tiny(d=8), tmp_path / "spt")
    layers = adapter_layers(again)
    for name, idx in plan.entries.items():
        assert torch.equal(layers[name].adapter.indices, idx)
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_gpt2_conv1d_entries_are_chosen_in_the_stored_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.layers = torch.nn.ModuleList(Conv1D(12, 8) for _ in range(2))  # W stored (8, 12)
    model.head = torch.nn.Linear(12, 3)
    x, y = data(d=8)

    def forward(inputs):
        return model.head(sum(layer(inputs).tanh() for layer in model.layers))

    loss = lambda b: F.cross_entropy(forward(x[8 * b : 8 * b + 8]), y[8 * b : 8 * b + 8])  # noqa: E731
    plan = spt.select(model, loss, budget=20, batches=2, r=2, alpha=1.0)
    assert plan.entries and not plan.lowrank
    names = ["layers.0", "layers.1"]
    stored = spt.sensitivity(loss, {n: model.get_submodule(n).weight for n in names}, 2)
    picked, rest = [], []
    for name in names:  # the global top-τ′, read in the stored (d_in=8, d_out=12) layout
        chosen = torch.zeros(8, 12, dtype=torch.bool)
        if name in plan.entries:
            idx = plan.entries[name]  # canonical (d_out=12, d_in=8) flat indices
            chosen[idx % 8, idx // 8] = True
        picked.append(stored[name][chosen])
        rest.append(stored[name][~chosen])
    assert torch.cat(picked).min() >= torch.cat(rest).max()
    assert len(torch.cat(picked)) == plan.tau
    spt.apply(model, plan, r=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.adapter.values.normal_()
    for name, layer in zip(names, model.layers, strict=True):
        dense = layer.adapter.delta().materialize()
        assert dense.shape == (8, 12)
        nz = set(torch.nonzero(dense.reshape(-1)).reshape(-1).tolist())
        idx = plan.entries[name]
        assert nz == set(((idx % 8) * 12 + idx // 8).tolist())
