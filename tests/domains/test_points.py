"""Point clouds: the point transformer, Point-PEFT, the synthetic clouds, the bench driver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splice.data.synthetic.points import PRIMITIVES, digit_clouds, primitives
from splice.domains.backbones.points import PointConfig, PointTransformer, fps, group, knn
from splice.domains.point_peft import GeometryAdapter, PointPEFT, PointPriorPrompt, memory_bank
from splice.errors import SpliceError

CFG = PointConfig(groups=8, k=6, dim=16, depth=2, heads=2)


def _cloud(b=3, n=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(b, n, 3)).astype(np.float32))


def test_fps_spreads_points_and_knn_orders_by_distance():
    xyz = _cloud()
    idx = fps(xyz, 5)
    assert idx.shape == (3, 5) and all(len(set(r.tolist())) == 5 for r in idx)
    far = (xyz - xyz.mean(1, keepdim=True)).norm(dim=-1).argmax(1)
    assert torch.equal(idx[:, 0], far)
    # each new sample is the point farthest from those already chosen
    d = torch.cdist(xyz[0], xyz[0, idx[0, :2]]).min(1).values
    assert idx[0, 2] == d.argmax()
    nb = knn(xyz[:, :4], xyz, 3)
    ref = torch.cdist(xyz[:, :4], xyz).argsort(-1)[..., :3]
    assert torch.equal(nb.sort(-1).values, ref.sort(-1).values)


def test_fewer_points_than_k_is_an_error_naming_the_values():
    with pytest.raises(SpliceError, match="has 5 points, fewer than k=6"):
        group(_cloud(n=5), 2, 6)
    with pytest.raises(SpliceError, match="cannot sample 9 centres from 5 points"):
        fps(_cloud(n=5), 9)


def test_groups_are_local_coordinates_around_centres():
    g = group(_cloud(), 4, 6)
    assert g.centers.shape == (3, 4, 3) and g.local.shape == (3, 4, 6, 3)
    assert torch.allclose(
        g.local.norm(dim=-1).min(-1).values, torch.zeros(3, 4)
    )  # the centre itself


def test_geometry_adapter_is_permutation_equivariant_over_groups():
    torch.manual_seed(0)
    a = GeometryAdapter(16, 4)
    torch.nn.init.normal_(a.up.weight)
    h, centers = torch.randn(2, 10, 16), torch.randn(2, 10, 3)
    perm = torch.randperm(10)
    out = a(h, knn(centers, centers, 4))
    out_p = a(h[:, perm], knn(centers[:, perm], centers[:, perm], 4))
    assert torch.allclose(out[:, perm], out_p, atol=1e-6)
    # the neighbourhood term is a max over the k nearest centres: independent reference
    z = F.gelu(a.down(h))
    nb = torch.cdist(centers, centers).argsort(-1)[..., :4]
    ref = a.up(z + torch.stack([z[b, nb[b]].amax(1) for b in range(2)]))
    assert torch.allclose(out, ref, atol=1e-6)


def test_point_peft_does_not_depend_on_point_order():
    torch.manual_seed(0)
    model = PointPEFT(PointTransformer(CFG), 10, tokens=3, r=4, k=3, bank=torch.randn(5, 16))
    for a in model.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.1)
    xyz = _cloud()
    perm = torch.randperm(xyz.shape[1])
    out, out_p = model(group(xyz, 8, 6)), model(group(xyz[:, perm], 8, 6))
    assert torch.allclose(out, out_p, atol=1e-5)


def test_point_peft_starts_as_the_backbone_and_trains_only_its_own_parameters():
    torch.manual_seed(0)
    backbone = PointTransformer(CFG)
    g = group(_cloud(), 8, 6)
    ref = backbone.features(g)
    model = PointPEFT(backbone, 10, tokens=0, r=4, k=3)
    feats = backbone.features(g, None, lambda i, x: x + model.adapters[i](x))
    assert torch.allclose(ref, feats)
    model = PointPEFT(backbone, 10, tokens=4, r=4, k=3)
    model(g).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(not n.startswith("backbone.") for n in trainable)
    assert model.prompt.prompts.grad.abs().sum() > 0  # the prompts reach the output
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.25 * total


def test_point_prior_prompt_is_parameter_free_attention_over_the_bank():
    torch.manual_seed(0)
    bank = torch.randn(7, 16)
    pp = PointPriorPrompt(16, 3, bank, tau=0.5, weight=0.3)
    p = pp.prompts.detach()
    sim = torch.stack(
        [torch.stack([F.cosine_similarity(p[i], bank[j], 0) for j in range(7)]) for i in range(3)]
    )
    assert torch.allclose(pp(), p + 0.3 * torch.softmax(sim / 0.5, -1) @ bank, atol=1e-6)
    assert sum(x.numel() for x in pp.parameters()) == 3 * 16  # the bank is a buffer
    no_bank = PointPriorPrompt(16, 3)
    assert torch.equal(no_bank(), no_bank.prompts)


def test_memory_bank_is_the_mean_embedded_group_token():
    backbone = PointTransformer(CFG)
    gs = [group(_cloud(seed=s), 8, 6) for s in range(2)]
    bank = memory_bank(backbone, gs, size=4)
    assert bank.shape == (4, 16)
    assert torch.allclose(bank[:3], backbone.tokens(gs[0])[:, 1:].mean(1))


def test_primitives_are_seeded_normalised_and_labelled():
    a, la = primitives(12, 64, seed=3)
    b, lb = primitives(12, 64, seed=3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert (
        a.shape == (12, 64, 3) and a.dtype == np.float32 and set(la) <= set(range(len(PRIMITIVES)))
    )
    assert np.allclose(np.linalg.norm(a, axis=-1).max(1), 1, atol=1e-5)
    assert np.allclose(a.mean(1), 0, atol=1e-5)


def test_digit_clouds_follow_the_ink():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, 5:20, 10] = 255  # a vertical stroke
    img[1, 14, 3:25] = 255  # a horizontal one
    flat, lab = digit_clouds(img, np.array([1, 7]), 50, dims=2, seed=0)
    assert np.all(flat[..., 2] == 0) and list(lab) == [1, 7]
    assert np.ptp(flat[0, :, 1]) > 5 * np.ptp(flat[0, :, 0])
    assert np.ptp(flat[1, :, 0]) > 5 * np.ptp(flat[1, :, 1])
    solid, _ = digit_clouds(img, np.array([1, 7]), 50, dims=3, tilt=0, seed=0)
    assert np.ptp(solid[..., 2]) > 0
    with pytest.raises(SpliceError, match="dims must be 2 or 3, got 4"):
        digit_clouds(img, np.array([1, 7]), dims=4)


def test_bench_driver_trains_caches_and_compares(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path))
    from splice.bench.domains.common import run_study
    from splice.bench.domains.points import PointsSetup, digits, pretrained, run_method

    setup = PointsSetup(
        points=64,
        backbone=CFG,
        pretrain_clouds=64,
        pretrain_steps=3,
        train=40,
        val=8,
        test=20,
        steps=2,
        batch=8,
    )
    bench = (pretrained, digits, run_method)
    facts, _, rows, _ = run_study(setup, ("full", "lora", "point-peft"), (1.0,), bench, "", print)
    assert not facts["cached"] and pretrained(setup)[1]["cached"]
    by = {r.method: r for r in rows}
    assert by["point-peft"].trainable < 0.2 * by["full"].trainable  # ~5 % at the default size
    assert (
        abs(by["lora"].trainable - by["point-peft"].trainable) < 0.25 * by["point-peft"].trainable
    )
    assert all(0 <= r.score <= 100 for r in rows)
