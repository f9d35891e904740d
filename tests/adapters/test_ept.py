"""EPT (spec §6): pyramid kernels, task routing, per-task merge and the contrastive loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splice.adapters import (
    adapter_deltas,
    adapter_layers,
    aux_loss,
    inject,
    merge_adapters,
    unmerge_adapters,
)
from splice.adapters.ept import EPTConfig, set_task

from .conftest import make_model, perturb

# for test_contract.py: κ = 0 so that ΔW = 0 at init (the released default is Kaiming)
CONTRACT_CASES = {"ept": dict(r=4, kernels=[2, 2, 4], top_k=2, tasks=2, zero_init_kernels=True)}


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
    model, x = ept_model(contrastive_coef=0.1, contrastive_modules="all")
    model.train()
    set_task(model, 1)
    model(x)
    adapters = [layer["proj"].adapter for layer in model.layers]
    hand = []
    for a in adapters:
        sim = F.normalize(x[:, 0], dim=-1) @ F.normalize(a.task_embedding, dim=-1).t() / 0.05
        hand.append(F.cross_entropy(sim, torch.ones(2, dtype=torch.long)))
    assert torch.allclose(aux_loss(model), 0.1 * torch.stack(hand).mean(), atol=1e-6)


def test_defaults_are_the_released_codes():
    """Errata §6: Kaiming kernels, 8 task slots, the contrastive loss over encoder modules."""
    cfg = EPTConfig()
    assert (cfg.tasks, cfg.zero_init_kernels, cfg.contrastive_modules) == (8, False, "encoder")
    assert (cfg.r, cfg.alpha, cfg.kernels, cfg.top_k, cfg.dropout) == (
        8, 32.0, [2, 2, 4, 4, 6, 6, 8, 8], 2, 0.1,
    )  # fmt: skip


def test_kernels_are_kaiming_with_fan_in_m_times_k():
    """κ_e ~ U(±1/√(m_e·k_e)), m_e = ⌊d_out/k_e⌋ (torch's fan-in of the code's (1, m, k, 1)
    kernel, a=√5); A and B are Kaiming too, so the adapter changes the output at step 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 600))
    with torch.no_grad():
        y0 = model(torch.ones(1, 64))
    inject(model, "ept", ["0"], kernels=[2, 6, 8], top_k=1)
    a = model[0].adapter
    for k, kappa in zip([2, 6, 8], a.kernels, strict=True):
        m = 600 // k
        bound = 1 / math.sqrt(m * k)
        assert kappa.shape == (m, k)
        assert kappa.abs().max() <= bound and kappa.abs().max() > 0.95 * bound
        assert kappa.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert a.lora_A.abs().max() <= 1 / math.sqrt(32) and a.lora_B.abs().max() <= 1 / math.sqrt(8)
    with torch.no_grad():
        assert not torch.allclose(model(torch.ones(1, 64)), y0)


def _tiny(cls_name: str, config_name: str, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(getattr(transformers, config_name)(**kw))


def _first_tokens(model):
    """A hook per adapted layer recording its input's first token, by module name."""
    seen = {}
    for name, layer in adapter_layers(model).items():
        layer.register_forward_hook(lambda m, args, out, n=name: seen.__setitem__(n, args[0][:, 0]))
    return seen


def test_contrastive_loss_is_the_encoder_mean_in_t5():
    model = _tiny(
        "T5ForConditionalGeneration", "T5Config", vocab_size=40, d_model=16, d_kv=8,
        num_heads=2, d_ff=32, num_layers=2, num_decoder_layers=2, decoder_start_token_id=0,
    )  # fmt: skip
    inject(model, "ept", ["q", "k", "v", "o", "wi", "wo"], r=2, kernels=[2, 4], top_k=1)
    seen = _first_tokens(model)
    model.train()
    set_task(model, 5)
    ids = torch.randint(1, 40, (3, 7))
    model(input_ids=ids, labels=torch.randint(1, 40, (3, 4)))
    layers = adapter_layers(model)
    encoder = [n for n in layers if n.startswith("encoder.")]
    assert len(encoder) == 2 * 6 and len(layers) == 2 * 6 + 2 * 10
    hand = []
    for name in encoder:
        tau = layers[name].adapter.task_embedding
        sim = F.normalize(seen[name], dim=-1) @ F.normalize(tau, dim=-1).t() / 0.05
        hand.append(F.cross_entropy(sim, torch.full((3,), 5)))
    assert torch.allclose(aux_loss(model), 0.1 * torch.stack(hand).mean(), atol=1e-6)
    assert all(layers[n].adapter.last_first_token is None for n in layers if n not in encoder)


def test_no_contrastive_loss_in_a_decoder_only_model():
    model = _tiny(
        "LlamaForCausalLM", "LlamaConfig", vocab_size=40, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    inject(model, "ept", ["q_proj", "v_proj"], r=2, kernels=[2, 4], top_k=1)
    model.train()
    ids = torch.randint(1, 40, (2, 5))
    model(input_ids=ids, labels=ids)
    assert aux_loss(model) is None
    # every module, as an option (e.g. encoder-only stacks not named ``encoder``)
    model = _tiny(
        "LlamaForCausalLM", "LlamaConfig", vocab_size=40, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    inject(model, "ept", ["q_proj"], r=2, kernels=[2], top_k=1, contrastive_modules="all")
    model.train()(input_ids=ids, labels=ids)
    assert aux_loss(model) is not None


@pytest.mark.parametrize(
    ("name", "encoder"),
    [
        ("encoder.block.0.layer.0.SelfAttention.q", True),
        ("bert.encoder.layer.3.attention.self.query", True),
        ("decoder.block.0.layer.1.EncDecAttention.q", False),
        ("decoder.bert.encoder.layer.0.attention.self.query", False),
        ("model.decoder.layers.0.encoder_attn.q_proj", False),
        ("model.layers.0.self_attn.q_proj", False),
        ("transformer.h.0.attn.c_attn", False),
    ],
)
def test_in_encoder(name, encoder):
    from splice.adapters.ept import in_encoder

    assert in_encoder(name) is encoder
