"""AdaLoRA specifics: SVD form, the cubic budget schedule (checked against peft's own), the
pruning it drives through the one training loop, the orthogonality regulariser."""

from __future__ import annotations

import pytest
import torch

from splice.adapters import adapter_layers, aux_loss, inject
from splice.adapters.adalora import AdaLoRAConfig, budget_schedule
from splice.train import TrainStep

from .conftest import make_model, perturb
from .test_peft_interop import IDS, tiny_bert

CONTRACT_CASES = {"adalora": dict(r=4, target_r=2, alpha=8)}  # for test_contract.py
peft = pytest.importorskip("peft")


def test_budget_schedule_matches_peft():
    from peft.tuners.adalora.layer import RankAllocator

    cfg = dict(init_r=6, target_r=2, tinit=3, tfinal=4, total_step=30, deltaT=2)
    model = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(target_modules=["query"], **cfg))
    theirs = RankAllocator(model, model.peft_config["default"], "default")
    ours = AdaLoRAConfig(r=6, target_r=2, tinit=3, tfinal=4, total_step=30, deltaT=2)
    for step in range(32):
        assert budget_schedule(ours, step, theirs.init_bgt, theirs.target_bgt) == (
            theirs.budget_schedule(step)
        )


def test_training_prunes_to_the_target_budget_and_keeps_it():
    model, x = make_model("linear")
    inject(model, "adalora", ["proj"], r=4, target_r=2, total_step=12, tinit=2, tfinal=3)
    perturb(model)
    target = torch.randn(2, 5, 12)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = TrainStep(lambda i: (torch.nn.functional.mse_loss(model(x), target), 2), opt, aux=model)
    live = []
    for i in range(16):
        step(i)
        live.append(
            sum(int(a.adapter.lora_E.count_nonzero()) for a in adapter_layers(model).values())
        )
    assert live[0] == 12 and live[8] == 2 * 3 and live[-1] == 2 * 3  # Σr → target_r·sites


def test_orthogonality_regulariser_is_the_mean_gram_distance():
    model, _ = make_model("linear")
    inject(model, "adalora", ["proj"], r=3, orth_reg_weight=0.25)
    layers = list(adapter_layers(model).values())
    expected = 0.0
    for layer in layers:
        a, b = layer.adapter.lora_A, layer.adapter.lora_B
        expected += torch.linalg.norm(a @ a.T - torch.eye(3)) + torch.linalg.norm(
            b.T @ b - torch.eye(3)
        )
    assert torch.allclose(aux_loss(model), 0.25 * expected / (2 * len(layers)))


def test_peft_pruned_dir_loads_with_its_rank_pattern(tmp_path):
    config = peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["query", "value"],
                                total_step=10, tinit=1, tfinal=2)  # fmt: skip
    pm = peft.get_peft_model(tiny_bert(), config)
    perturb(pm, std=0.1)
    for i in range(9):  # prune with peft's own allocator: the dir then has a rank_pattern
        out = pm(input_ids=IDS, labels=torch.tensor([0, 1]))
        out.loss.backward()
        pm.base_model.update_and_allocate(i)
        pm.zero_grad()
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    pm.save_pretrained(tmp_path / "p")
    from splice.adapters import load_adapter

    model = load_adapter(tiny_bert(), tmp_path / "p")
    with torch.no_grad():
        got = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_for_run_gives_adalora_the_run_length_unless_set():
    from splice.adapters import for_run

    assert for_run("adalora", {"r": 4}, 40) == {"r": 4, "total_step": 40}
    assert for_run("adalora", {"total_step": 7}, 40) == {"total_step": 7}
    assert for_run("adalora", {"r": 4}, None) == {"r": 4}  # epoch-based run: unknown length
    assert for_run("lora", {"r": 4}, 40) == {"r": 4}
