"""Queryable LoRA [recon] (spec peft.md §4 with its errata, §22.6)."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.adapters import adapter_layers, inject
from splice.adapters.querylora import set_instruction
from splice.errors import SpliceError

from .conftest import make_model, perturb

CONTRACT_CASES = {
    "querylora": {"r": 2, "atoms": 3, "top_k": 2, "key_dim": 4},
    "querylora-prior": {"r": 2, "atoms": 3, "top_k": 1, "identity": True, "instruction_dim": 5},
}


def _memory(model):
    return next(iter(adapter_layers(model).values())).adapter.memory


def test_one_atom_with_zero_update_is_lora():
    model, x = make_model("linear")
    inject(model, "querylora", ["proj"], r=4, atoms=1, top_k=1, identity=True)
    perturb(model)
    with torch.no_grad():
        _memory(model).atoms.zero_()
        got = model(x)
    lora, _ = make_model("linear")
    inject(lora, "lora", ["proj"], r=4)
    with torch.no_grad():
        for name, layer in adapter_layers(lora).items():
            q = adapter_layers(model)[name].adapter
            layer.adapter.lora_A.copy_(q.lora_A)
            layer.adapter.lora_B.copy_(q.lora_B)
        assert torch.allclose(lora(x), got, atol=1e-6)
        assert not torch.allclose(got, make_model("linear")[0](x))  # the update is not zero


def test_routing_is_a_top_k_convex_combination_and_the_update_is_bounded():
    torch.manual_seed(0)
    model, _ = make_model("linear")
    inject(model, "querylora", ["proj"], r=4, atoms=5, top_k=2, block=1)
    perturb(model, std=0.5)
    memory = _memory(model)
    layer = adapter_layers(model)["layers.0.proj"].adapter
    bound = torch.linalg.matrix_norm(memory.atoms.detach(), ord=2).max()
    for seed in range(5):
        x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(seed)) * 3
        with torch.no_grad():
            model(x)
            w = memory.last_weights
            assert torch.allclose(w.sum(-1), torch.ones(6))
            assert ((w > 0).sum(-1) == 2).all() and (w >= 0).all()
            r = memory.routes[0][0]
            assert (torch.linalg.matrix_norm(r, ord=2) <= bound + 1e-5).all()
            base = torch.zeros(6, 5, 12)
            delta = layer(x, base)  # Δ(x) of one module: s·B R A x
            ax = x @ layer.lora_A.t()
            limit = layer.scale * torch.linalg.matrix_norm(layer.lora_B, ord=2) * bound
            assert (delta.norm(dim=-1) <= limit * ax.norm(dim=-1) + 1e-4).all()


def test_blocks_share_one_route_and_the_summary_sees_earlier_blocks():
    model, x = make_model("linear")
    inject(model, "querylora", ["proj"], r=3, atoms=4, top_k=2, block=2)
    memory = _memory(model)
    with torch.no_grad():
        model(x)
        assert sorted(memory.routes) == [0, 1]  # layers 0,1 → block 0; layer 2 → block 1
        assert memory.routes[0][1] == {"layers.0.proj", "layers.1.proj"}
        assert len(memory.states) == 2
        model(x)  # a second forward starts over
        assert len(memory.states) == 2
    y = model(x)  # with a graph: the routing state holds non-leaf tensors
    twin = copy.deepcopy(model)  # … which a copy drops
    assert not _memory(twin).routes and torch.allclose(twin(x), y)


def test_instruction_prior_biases_routing_and_weight_zero_removes_it():
    torch.manual_seed(0)
    model, x = make_model("linear")
    inject(model, "querylora", ["proj"], r=3, atoms=4, top_k=1, instruction_dim=6)
    memory = _memory(model)
    e = torch.randn(6)
    with torch.no_grad():
        memory.prior.zero_()
        memory.prior[2] = 50 * e / e.norm() ** 2  # π(e) puts almost all mass on atom 2
        set_instruction(model, e)
        model(x)
        assert (memory.last_weights.argmax(-1) == 2).all()
        memory.cfg = memory.cfg.model_copy(update={"prior_weight": 0.0})
        z = torch.randn(2, 3)
        memory.reset()
        no_prior = memory.logits(z)
        memory.prior.normal_()  # λ = 0: the prior's parameters do not matter
        assert torch.allclose(memory.logits(z), no_prior)


def test_wrong_instruction_width_is_an_error():
    model, _ = make_model("linear")
    inject(model, "querylora", ["proj"], instruction_dim=6)
    with pytest.raises(SpliceError, match="width 5; the adapter takes 6"):
        set_instruction(model, torch.randn(5))


def test_routing_is_fp32_under_autocast():
    """Two keys 0.2 % apart: a bf16 logit (one step is 0.4 %) ties them and top-1 takes
    either; under autocast the routing still picks the atom fp32 picks, sample by sample."""
    model, x = make_model("linear")
    inject(model, "querylora", ["proj"], r=2, atoms=2, top_k=1, key_dim=4, block=3)
    memory = _memory(model)
    with torch.no_grad():
        memory.keys[1] = memory.keys[0] * 1.002
        model(torch.cat([x, -x]))  # z and −z: q·κ₀ of both signs, so both atoms win somewhere
        want = memory.last_weights.argmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.cat([x, -x]))
    assert want.unique().numel() == 2
    assert torch.equal(memory.last_weights.argmax(-1), want)
