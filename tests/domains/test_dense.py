"""Dense multi-task vision: the hierarchical backbone, TAP-SLF, Polyhistor(-Lite), the data,
the bench driver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.data.synthetic.dense import cluttered_digits
from splice.domains.backbones.hier import Block, HierBackbone, HierConfig
from splice.domains.dense import MultiTask, PerTaskAdapters, task_score
from splice.domains.polyhistor import (
    DecomposedHyper,
    Polyhistor,
    PolyhistorLite,
    kron_expand,
    scaling_shape,
)
from splice.domains.tap_slf import TapSlf, layer_sets
from splice.errors import SpliceError

CFG = HierConfig(image=16, patch=2, widths=(8, 16, 32), depths=(2, 1, 3), heads=(2, 2, 4), window=4)


def _backbone(seed=0):
    torch.manual_seed(seed)
    return HierBackbone(CFG)


def _images(b=2, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((b, 1, 16, 16)).astype(np.float32))


def test_stage_maps_have_the_stated_shapes_and_bad_sides_fail():
    maps = _backbone().features(_images())
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]
    with pytest.raises(SpliceError, match="image side 20 does not tile patch 2"):
        HierBackbone(
            HierConfig(image=20, patch=2, widths=(8, 16, 32), depths=(1, 1, 1), heads=(1, 1, 1))
        )


def test_window_attention_keeps_windows_apart_and_equals_global_attention_on_one_window():
    torch.manual_seed(0)
    blk = Block(8, 2, window=4)
    x = torch.randn(1, 64, 8)
    y = x.clone()
    y[0, 0] += 1.0  # token (0, 0): the top-left window only
    d = (blk(x, (8, 8)) - blk(y, (8, 8))).abs().sum(-1).reshape(8, 8)
    assert d[:4, :4].sum() > 0 and d[4:, :].sum() == 0 and d[:, 4:].sum() == 0
    glob = Block(8, 2, window=0)
    glob.load_state_dict(blk.state_dict())
    x4 = torch.randn(1, 16, 8)
    assert torch.allclose(blk(x4, (4, 4)), glob(x4), atol=1e-6)


def test_prefix_tokens_change_their_stage_and_are_stripped():
    bb, x = _backbone(), _images()
    base = bb.features(x)
    out = bb.features(x, {2: torch.randn(5, 16)})  # block 2 is stage 1's only block
    assert [m.shape for m in out] == [m.shape for m in base]
    assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])
    # windowed stage: the prefix joins every window and is averaged back
    out0 = bb.features(x, {0: torch.randn(2, 8)})
    assert not torch.allclose(out0[0], base[0])
    with pytest.raises(SpliceError, match="prefix for block 2 has width 8, the block 16"):
        bb.features(x, {2: torch.randn(5, 8)})


def test_layer_sets_state_the_three_sets():
    code = layer_sets(12, fidelity="code")
    assert code.frozen == tuple(range(8)) and code.full == (8,) and code.lora == (9, 10, 11)
    assert code.merges_trainable
    intended = layer_sets(12)
    assert (
        intended.frozen == tuple(range(8))
        and intended.lora == (8, 9, 10, 11)
        and intended.full == ()
    )
    assert not intended.merges_trainable
    with pytest.raises(SpliceError, match="unknown fidelity 'paper'"):
        layer_sets(12, fidelity="paper")


def test_tap_slf_freezes_adapts_and_trains_the_stated_layers():
    model = TapSlf(_backbone(), r=2, alpha=4, tokens=3)  # 6 blocks: frozen 0–3, LoRA 4–5
    assert model.sets.lora == (4, 5)
    named = dict(model.backbone.named_parameters())
    for name, p in named.items():
        i = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if i is not None and i >= 4 and not (".attn." in name and "base_layer" in name):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad, name
    assert any("lora" in n.lower() or "adapter" in n for n, p in named.items() if p.requires_grad)
    code = TapSlf(
        _backbone(), r=2, alpha=4, fidelity="code"
    )  # 6 blocks: frozen 0–3, full 4, LoRA 5
    assert code.sets.full == (4,) and all(
        p.requires_grad for p in code.backbone.blocks[4].parameters()
    )
    assert all(p.requires_grad for p in code.backbone.merges.parameters())


def test_tap_slf_prompts_change_the_adapted_blocks_and_get_gradients():
    torch.manual_seed(0)
    model, x = TapSlf(_backbone(), r=2, alpha=4, tokens=3), _images()
    out = model(x, "mask")
    model.ablate = True
    assert not torch.allclose(out, model(x, "mask"))
    model.ablate = False
    model(x, "saliency").square().mean().backward()
    assert model.prompt_groups["regression"][0].grad.abs().sum() > 0
    assert model.prompt_groups["segmentation"][0].grad is None  # another type's prompts
    # The released bug: prompts concatenated after the last stage and sliced off — no effect.
    bb = model.backbone
    ref = bb.features(x)
    last = len(bb.blocks) - 1
    bug = bb.features(
        x,
        after_block=lambda i, t: (
            torch.cat([torch.randn(1, 3, 32).expand(2, -1, -1), t], 1)[:, 3:] if i == last else t
        ),
    )
    assert torch.equal(bug[-1], ref[-1])


def test_kronecker_expansion_equals_the_explicit_product_and_counts():
    torch.manual_seed(0)
    t, s = torch.randn(3, 2), torch.randn(4, 5)
    w = kron_expand(t, s)
    assert w.shape == (12, 10)
    for i in range(4):
        for j in range(5):
            assert torch.equal(w[i * 3 : i * 3 + 3, j * 2 : j * 2 + 2], s[i, j] * t)
    assert scaling_shape(32, 4, 8, 1) == (4, 4)
    with pytest.raises(SpliceError, match="template width 12 does not divide the stage's width 32"):
        scaling_shape(32, 4, 12, 1)
    lite = PolyhistorLite(_backbone(), ratio=4, k=2, emb=4, hidden=8)
    # widths 8,8 | 16 | 32,32,32 → r 2,2 | 4 | 8,8,8; template 8×2;
    # kernels (d/8)×(r/2), the up kernels transposed
    shapes = [(1, 1), (1, 1), (2, 2), (4, 4), (4, 4), (4, 4)]
    kernels = sum(a * b for a, b in shapes)
    assert sum(p.numel() for p in lite.down_kernels.parameters()) == kernels
    assert sum(p.numel() for p in lite.up_kernels.parameters()) == kernels
    hyper = (
        8 * 8 + 8 + 2 * ((8 + 1) * 8 * 2 + (8 + 1) * 2 * 2)
    )  # trunk + (d·k, r·k) heads for down and up
    assert sum(p.numel() for p in lite.hyper.parameters()) == hyper
    lite.hyper.heads[0]["up_l"].weight.data.normal_()
    down, up = lite.weights(1, 4)
    d0, _u0 = lite.hyper(lite.z(1, 4), 0)
    assert torch.equal(down, torch.kron(lite.down_kernels[4], d0)) and up.shape == (8, 32)


def test_decomposed_hypernetwork_emits_rank_k_factors():
    torch.manual_seed(0)
    h = DecomposedHyper(6, 10, [(16, 4), (32, 8)], k=2)
    torch.nn.init.normal_(h.heads[1]["up_l"].weight)
    down, up = h(torch.randn(6), 1)
    assert down.shape == (32, 8) and up.shape == (8, 32)
    assert torch.linalg.matrix_rank(down) <= 2 and torch.linalg.matrix_rank(up) <= 2


@pytest.mark.parametrize("kind", [Polyhistor, PolyhistorLite, PerTaskAdapters])
def test_adapters_start_as_the_backbone_and_train(kind):
    x = _images()
    full = MultiTask(_backbone())
    model = kind(_backbone(), ratio=4)
    model.heads.load_state_dict(full.heads.state_dict())
    assert torch.allclose(model(x, "edges"), full(x, "edges"), atol=1e-6)
    model(x, "edges").square().mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    grads = [
        p.grad
        for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith("heads.")
    ]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_polyhistor_shares_one_hypernetwork_and_is_smaller_than_per_task_adapters():
    def own(m):
        return sum(
            p.numel()
            for n, p in m.named_parameters()
            if p.requires_grad and not n.startswith("heads.")
        )

    per_task, poly = (
        own(PerTaskAdapters(_backbone(), ratio=4)),
        own(Polyhistor(_backbone(), ratio=4, hidden=4, emb=4)),
    )
    lite = own(PolyhistorLite(_backbone(), ratio=4, hidden=4, emb=4))
    assert lite < poly < per_task
    with pytest.raises(SpliceError, match="task 'depth' is not one of this model's"):
        Polyhistor(_backbone())(_images(), "depth")


def test_task_scores_match_hand_computed_values():
    t = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    p = torch.tensor([[[[2.0, -1.0, 3.0, -2.0]]]])  # predicts pixels 0 and 2
    assert task_score("mask", p, t) == pytest.approx(100 / 3)  # IoU 1/3
    assert task_score("edges", p, t) == pytest.approx(50.0)  # F1 2·1/(2+2)
    assert task_score("cls", torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 50.0
    sal = torch.tensor([[[0.0, 1.0]]])
    logits = torch.logit(torch.tensor([[[[0.0 + 1e-6, 1.0 - 1e-6]]]]))
    assert task_score("saliency", logits, sal) == pytest.approx(100.0, abs=1e-3)


def test_cluttered_digits_targets_agree_and_are_seeded():
    a, ta = cluttered_digits(6, seed=2)
    b, tb = cluttered_digits(6, seed=2)
    assert np.array_equal(a, b) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert a.shape == (6, 1, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert np.all(ta["edges"] <= ta["mask"]) and ta["edges"].sum() < ta["mask"].sum()
    assert np.allclose(ta["saliency"].max((1, 2)), 1)
    assert ta["cls"].shape == (6,)


def test_bench_driver_runs_every_method(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path))
    from splice.bench.domains.common import run_study
    from splice.bench.domains.dense import METHODS, DenseSetup, data, pretrained, run_method

    cfg = HierConfig(widths=(8, 16, 32), depths=(1, 1, 2), heads=(1, 2, 2))
    setup = DenseSetup(
        backbone=cfg,
        pretrain_images=64,
        pretrain_steps=2,
        train=16,
        val=4,
        test=8,
        steps=4,
        batch=4,
    )
    bench = (pretrained, data, run_method)
    _facts, _, rows, _ = run_study(setup, METHODS, (1.0,), bench, "", print)
    by = {r.method: r for r in rows}
    assert set(by) == set(METHODS) and "prompts removed" in by["tap-slf"].detail
    assert by["polyhistor-lite"].trainable < by["per-task"].trainable < by["full"].trainable
