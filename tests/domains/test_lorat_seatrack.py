"""LoRAT and SEATrack (issue #34): decoupled embeddings, fused LoRA, merging, AMG-LoRA, HMoE."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.adapters import adapter_layers
from splice.domains.backbones.vit import ViT, ViTConfig
from splice.domains.lorat import FusedLoRA, OneStreamTracker, add_lora, merge_lora
from splice.domains.seatrack import HierarchicalMoE, SEATrack, SoftMoE
from splice.errors import SpliceError

CFG = ViTConfig(dim=32, depth=4, heads=2, mlp_ratio=2)


def _tracker(seed: int = 0) -> OneStreamTracker:
    torch.manual_seed(seed)
    return OneStreamTracker(ViT(CFG), template=16, search=32, hidden=16)


def _inputs(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    fg = torch.randint(0, 2, (n, 16), generator=g)
    return torch.rand(n, 16, 16, generator=g), torch.rand(n, 32, 32, generator=g), fg


def _randomise_lora(model: nn.Module) -> None:
    torch.manual_seed(5)
    for layer in adapter_layers(model).values():
        nn.init.normal_(layer.adapter.lora_B, std=0.2)


def test_decoupled_embedding_reproduces_pretrained_embedding():
    torch.manual_seed(0)
    vit = ViT(CFG)
    tracker = OneStreamTracker(vit)
    img = torch.rand(2, 28, 28)
    # zero type/foreground embeddings: a crop of the pretraining size embeds as the ViT does
    ours = tracker.embed.one(img, 1)
    torch.testing.assert_close(ours, vit.embed(img))
    reference = vit.patch_embed(
        img.reshape(2, 7, 4, 7, 4).permute(0, 1, 3, 2, 4).reshape(2, 49, 16)
    )
    torch.testing.assert_close(ours, reference + vit.pos_embed)
    with torch.no_grad():
        tracker.embed.type_embed[1] = 1.0
        tracker.embed.fg_embed[1] = 2.0
    fg = torch.zeros(2, 49, dtype=torch.long)
    fg[:, 3] = 1
    shifted = tracker.embed.one(img, 1, fg)
    torch.testing.assert_close(shifted[:, 0], vit.embed(img)[:, 0] + 1.0)
    torch.testing.assert_close(shifted[:, 3], vit.embed(img)[:, 3] + 3.0)


@pytest.mark.parametrize("size,what", [(18, "template"), (30, "search")])
def test_sizes_that_do_not_tile_the_patch_grid_fail(size, what):
    kwargs = {"template": 16, "search": 32, what: size}
    with pytest.raises(SpliceError, match=f"{what} size {size} does not tile the 4px patch"):
        OneStreamTracker(ViT(CFG), **kwargs)


def test_lora_on_every_linear_counts_and_freezes():
    tracker = add_lora(_tracker(), r=3)
    d, h = CFG.dim, CFG.dim * CFG.mlp_ratio
    per_block = 4 * 3 * (d + d) + 3 * (d + h) + 3 * (h + d)
    head = d * 16 + 16 + 16 * 5 + 5
    trainable = {n for n, p in tracker.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in tracker.parameters() if p.requires_grad) == (
        CFG.depth * per_block + head + 2 * 2 * d
    )
    assert len(adapter_layers(tracker)) == 6 * CFG.depth
    assert not any("pos_embed" in n or "patch_embed" in n or "norm" in n for n in trainable)


def test_fused_lora_equals_unfused_in_output_and_gradients():
    fused, plain = add_lora(_tracker(), fused=True), add_lora(_tracker(), fused=False)
    _randomise_lora(fused)
    _randomise_lora(plain)
    assert all(isinstance(m.adapter, FusedLoRA) for m in adapter_layers(fused).values())
    x = _inputs()
    outs = [m(*x) for m in (fused, plain)]
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for out in outs:
        (out[0].logsumexp(-1).sum() + out[1].square().mean()).backward()
    grads = [
        {n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (fused, plain)
    ]
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], atol=1e-4, rtol=1e-4, msg=n)
    assert grads[0]["blocks.0.attn.q.adapter.lora_A"].abs().sum() > 0


def test_merge_after_training_keeps_the_outputs_and_drops_the_adapters():
    tracker = add_lora(_tracker())
    _randomise_lora(tracker)
    x = _inputs()
    with torch.no_grad():
        before = tracker(*x)
        merged = merge_lora(tracker)
        after = merged(*x)
    assert not adapter_layers(merged)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _two(n: int = 2):
    t1, s1, fg = _inputs(n, 1)
    t2, s2, _ = _inputs(n, 2)
    return [t1, t2], [s1, s2], fg


def test_amg_lora_with_zero_mutual_weights_is_two_independent_loras():
    sea = SEATrack(_tracker(), mutual=False)
    _randomise_lora(sea)
    templates, searches, fg = _two()
    a, b = sea.streams(templates, searches, fg)
    t = sea.tracker  # the same frozen tracker with the same (shared) LoRA, one stream at a time
    for tm, se, got in ((templates[0], searches[0], a), (templates[1], searches[1], b)):
        x = t.embed(tm, se, fg)
        for block in t.blocks:
            x = block(x)
        torch.testing.assert_close(got, t.norm(x)[:, t.n_template() :], atol=1e-5, rtol=1e-5)
    lora = [n for n, _ in adapter_layers(sea).items()]
    assert sorted(lora) == [f"tracker.blocks.{i}.attn.{p}" for i in (1, 3) for p in "kv"]


def test_mutual_guidance_mixes_the_streams_and_learns():
    sea = SEATrack(_tracker(), mutual=True)
    plain = SEATrack(_tracker(), mutual=False)
    templates, searches, fg = _two()
    a, _ = sea.streams(templates, searches, fg)
    a0, _ = plain.streams(templates, searches, fg)
    assert (a - a0).abs().max() > 1e-4
    a.square().sum().backward()
    assert sea.guidance.grad is not None and sea.guidance.grad.abs().sum() > 0
    assert not plain.guidance.requires_grad
    trainable = [n for n, p in sea.named_parameters() if p.requires_grad]
    assert all(n.startswith(("guidance", "fusion")) or ".adapter." in n for n in trainable)
    diff = sum(p.numel() for p in sea.parameters() if p.requires_grad) - sum(
        p.numel() for p in plain.parameters() if p.requires_grad
    )
    assert diff == 4  # two scalars in each of the two guided blocks


def test_soft_moe_is_permutation_equivariant_and_hmoe_starts_as_the_visible_stream():
    torch.manual_seed(0)
    moe = SoftMoE(8, experts=3, slots=2, hidden=4)
    x = torch.randn(2, 10, 8)
    perm = torch.randperm(10)
    torch.testing.assert_close(moe(x[:, perm]), moe(x)[:, perm], atol=1e-5, rtol=1e-5)
    fusion = HierarchicalMoE(8)
    rgb, other = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    torch.testing.assert_close(fusion(rgb, other), rgb)
    fusion.out.weight.data.normal_()
    assert (fusion(rgb, other) - fusion(rgb, other + 1)).abs().max() > 1e-3


def test_seatrack_forward_and_frozen_tracker():
    tracker = _tracker()
    frozen = copy.deepcopy(tracker.state_dict())
    sea = SEATrack(tracker, mutual=True)
    templates, searches, fg = _two(3)
    scores, boxes = sea(templates, searches, fg)
    assert scores.shape == (3, 64) and boxes.shape == (3, 64, 4)
    opt = torch.optim.SGD([p for p in sea.parameters() if p.requires_grad], 0.1)
    (scores.logsumexp(-1).sum() + boxes.mean()).backward()
    opt.step()
    state = {k: v for k, v in sea.tracker.state_dict().items() if ".adapter." not in k}
    for k, v in frozen.items():
        name = k.replace(".k.", ".k.base_layer.").replace(".v.", ".v.base_layer.")
        torch.testing.assert_close(state.get(name, state.get(k)), v, msg=k)
