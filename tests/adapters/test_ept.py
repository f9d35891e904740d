"""EPT (spec §6): pyramid kernels, task routing, per-task merge and the contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.adapters import adapter_deltas, aux_loss, inject, merge_adapters, unmerge_adapters
from splice.adapters.ept import set_task

from .conftest import make_model, perturb

CONTRACT_CASES = {"ept": dict(r=4, kernels=[2, 2, 4], top_k=2, tasks=2)}  # for test_contract.py


def ept_model(**cfg):
    model, x = make_model("linear")
    inject(model, "ept", ["proj"], **{"r": 4, "kernels": [2, 2, 4], "top_k": 2, "tasks": 3, **cfg})
    perturb(model, std=0.3)
    return model.eval(), x


def test_kernel_expansion_is_a_grouped_transposed_conv():
    model, _ = ept_model()
    a = model.layers[0]["proj"].adapter
    k, kappa = 4, a.kernels[2]
    m = a.site.d_out // k
    u = torch.randn(3, m)
    expanded = (kappa[None] * u[:, :, None]).reshape(3, m * k)
    conv = F.conv_transpose1d(u[:, :, None], kappa[:, None, :], stride=k, groups=m)
    assert torch.allclose(expanded, conv.reshape(3, m * k))


def test_expert_weight_matches_definition():
    """ΔW_e[c·k + j, i] = κ_e[c, j]·(B_e A_e)[c, i] for i < n_e, else 0 (top-1, one expert)."""
    model, _ = ept_model(kernels=[4], top_k=1)
    a = model.layers[0]["proj"].adapter
    B, A = a.factors()
    dw = B @ A
    k, n, m = 4, 8 // 4, 12 // 4
    core = a.lora_B[:m] @ a.lora_A[:, :n]
    hand = torch.zeros(12, 8)
    for c in range(m):
        for j in range(k):
            hand[c * k + j, :n] = a.kernels[0][c, j] * core[c]
    assert torch.allclose(dw, hand, atol=1e-6)


def test_per_task_merge_reproduces_routed_forward_and_tasks_differ():
    model, x = ept_model()
    outs = []
    with torch.no_grad():
        for task in range(3):
            set_task(model, task)
            y = model(x)
            merge_adapters(model)
            assert torch.allclose(model(x), y, atol=1e-5)
            unmerge_adapters(model)
            outs.append(y)
        delta0 = adapter_deltas(set_task(model, 0))["layers.0.proj.weight"].materialize()
        delta1 = adapter_deltas(set_task(model, 1))["layers.0.proj.weight"].materialize()
    assert not torch.allclose(delta0, delta1)
    assert not torch.allclose(outs[0], outs[1])


def test_set_task_remerges_a_merged_model():
    model, x = ept_model()
    with torch.no_grad():
        set_task(model, 2)
        y2 = model(x)
        set_task(model, 0)
        merge_adapters(model)
        set_task(model, 2)
        assert torch.allclose(model(x), y2, atol=1e-5)


def test_routing_code_applies_softmax_to_probabilities_paper_renormalises():
    model, _ = ept_model()
    a = model.layers[0]["proj"].adapter
    logits = a.gate_weight @ a.task_embedding[0] + a.gate_bias
    p = logits.softmax(-1)
    top = p.topk(2)
    chosen, w = a.routing()
    assert chosen == top.indices.tolist()
    assert torch.allclose(w[top.indices], top.values.softmax(-1))
    a.cfg = a.cfg.model_copy(update={"routing": "paper"})
    _, w = a.routing()
    assert torch.allclose(w[top.indices], top.values / top.values.sum())


def test_contrastive_loss_by_hand():
    model, x = ept_model(contrastive_coef=0.1)
    model.train()
    set_task(model, 1)
    model(x)
    adapters = [layer["proj"].adapter for layer in model.layers]
    hand = []
    for a in adapters:
        sim = F.normalize(x[:, 0], dim=-1) @ F.normalize(a.task_embedding, dim=-1).t() / 0.05
        hand.append(F.cross_entropy(sim, torch.ones(2, dtype=torch.long)))
    assert torch.allclose(aux_loss(model), 0.1 * torch.stack(hand).mean(), atol=1e-6)
