"""PCB-Merging (spec merging.md §4) against a dense, sort-based copy of the authors' code."""

from __future__ import annotations

import pydantic
import pytest
import torch

from splice.merge.base import MergeContext, methods
from splice.merge.methods.pcb import PCB, pcb_balance, pcb_scores
from tests.merge._engine_run import engine_merge

SHAPES = {"a.weight": (7, 5), "a.bias": (11,), "b.conv": (3, 4, 2), "c.weight": (9, 6)}


def _models(num: int, seed: int = 0, identical: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tuned = []
    for t in range(num):
        src = 0 if identical else t
        gt = torch.Generator().manual_seed(seed + 100 + src)
        tuned.append({k: base[k] + 0.1 * torch.randn(s, generator=gt) for k, s in SHAPES.items()})
    return base, tuned


def _stats(method, base, tuned, params, model_params):
    """What the engine does first: stream each stat over all tensors until it is final."""
    stats = {}
    for stat in method.global_stats(params, model_params):
        for _ in range(16):
            for name in base:
                ctx = MergeContext(name, stats=stats)
                stat.observe(name, base[name], [m[name] for m in tuned], ctx)
            if stat.end_pass():
                break
        stats[stat.key] = stat.result()
    return stats


def _run(method, base, tuned, params, model_params):
    """Stats, then the merge pass tensor by tensor."""
    stats = _stats(method, base, tuned, params, model_params)
    return {
        name: method.merge(
            base[name],
            [m[name] for m in tuned],
            params,
            model_params,
            MergeContext(name, stats=stats),
        )
        for name in base
    }


def _reference(base, tuned, ratio, clip, inter, lams, lam):
    """The authors' pcb_ES.py / pcb.py / pcb-merging.py on a globally flattened model."""
    keys = sorted(base)
    flat = torch.stack([torch.cat([(m[k] - base[k]).flatten() for k in keys]) for m in tuned])
    n, d = flat.shape

    def clamp(x, lo_ratio, hi_ratio):
        srt = torch.sort(x, dim=1).values
        lo = srt[:, int(d * lo_ratio)].unsqueeze(1)
        hi = srt[:, int(d * (1 - hi_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def normalize(x):
        mn = x.min(dim=1, keepdim=True).values
        mx = x.max(dim=1, keepdim=True).values
        return (x - mn) / (mx - mn)

    mag = clamp(flat.abs(), clip, clip)
    clipped = torch.sign(flat) * mag
    normed = torch.sign(flat) * normalize(mag)
    intra = torch.exp(n * normalize(mag) ** 2)
    if inter == "pairwise":
        cross = torch.stack([torch.tanh(normed[i] * normed).sum(0) for i in range(n)])
    elif inter == "normalized":
        cross = torch.tanh(flat * normed.sum(0))
    else:
        cross = torch.tanh(flat * flat.sum(0))
    scale = normalize(clamp(intra * cross, 1 - ratio, 0))
    tvs = clipped * torch.tensor(lams).unsqueeze(1)
    merged = (tvs * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    out, start = {}, 0
    for k in keys:
        size = base[k].numel()
        out[k] = base[k] + lam * merged[start : start + size].reshape(base[k].shape)
        start += size
    return out


@pytest.mark.parametrize("inter", ["pairwise", "normalized", "raw"])
def test_pcb_matches_dense_reference(inter):
    base, tuned = _models(3)
    params = PCB.Params(ratio=0.2, clip=0.05, inter=inter, **{"lambda": 1.3})
    mps = [PCB.ModelParams(weight=w) for w in (1.0, 0.8, 1.2)]
    got = _run(PCB(), base, tuned, params, mps)
    ref = _reference(base, tuned, 0.2, 0.05, inter, [1.0, 0.8, 1.2], 1.3)
    for k in base:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_chunked_columns_give_the_same_merge(monkeypatch):
    """Large tensors are processed in column chunks; the result must not depend on them."""
    import splice.merge.methods.pcb as pcb_module

    base, tuned = _models(3, seed=9)
    params = PCB.Params(ratio=0.3, clip=0.05)
    mps = [PCB.ModelParams()] * 3
    whole = _run(PCB(), base, tuned, params, mps)
    monkeypatch.setattr(pcb_module, "CHUNK", 8 * 3 * 7)  # 7 columns
    chunked = _run(PCB(), base, tuned, params, mps)
    for k in base:
        assert torch.equal(chunked[k], whole[k])


def test_pcb_default_clip_and_ratio_match_reference():
    base, tuned = _models(4, seed=3)
    params = PCB.Params()
    got = _run(PCB(), base, tuned, params, [PCB.ModelParams()] * 4)
    ref = _reference(base, tuned, 0.05, 0.01, "pairwise", [1.0] * 4, 1.0)
    for k in base:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_identical_tasks_full_ratio_give_clipped_vector_except_row_minimum():
    """Spec §17: T identical τ, r = 1 → λ·clipped τ except where β is minimal (score 0)."""
    base, tuned = _models(3, identical=True)
    params = PCB.Params(ratio=1.0, clip=0.02, **{"lambda": 0.7})
    got = _run(PCB(), base, tuned, params, [PCB.ModelParams()] * 3)
    ref_clip = _reference(base, [tuned[0]], 1.0, 0.02, "pairwise", [1.0], 1.0)  # T=1: clipped τ
    keys = sorted(base)
    tau = torch.cat([(tuned[0][k] - base[k]).flatten() for k in keys])
    clipped = torch.cat([(ref_clip[k] - base[k]).flatten() for k in keys])
    merged = torch.cat([(got[k] - base[k]).flatten() for k in keys])
    # β is a function of |τ| and sign agreement; all tasks agree, so β is minimal where the
    # clipped magnitude is minimal.
    mag = clipped.abs()
    at_min = mag == mag.min()
    torch.testing.assert_close(merged[~at_min], 0.7 * clipped[~at_min], rtol=1e-5, atol=1e-7)
    assert torch.all(merged[at_min] == 0)
    assert at_min.sum() < tau.numel() // 10


def test_positive_scaling_of_intra_scores_leaves_scores_unchanged():
    """Spec §17: step 5's min–max makes a positive factor on β (i.e. on intra) irrelevant."""
    g = torch.Generator().manual_seed(1)
    beta = torch.randn(3, 500, generator=g)
    srt = beta.sort(dim=1).values
    idx = int(500 * (1 - 0.1))
    s1 = pcb_scores(beta, srt[:, idx], srt[:, -1])
    s2 = pcb_scores(4.5 * beta, 4.5 * srt[:, idx], 4.5 * srt[:, -1])
    torch.testing.assert_close(s1, s2)


def test_each_task_keeps_the_ratio_and_the_merge_is_a_convex_combination():
    base, tuned = _models(3, seed=7)
    params = PCB.Params(ratio=0.25, clip=0.01)
    mps = [PCB.ModelParams()] * 3
    method = PCB()
    stats = _stats(method, base, tuned, params, mps)
    total = sum(t.numel() for t in base.values())
    kept_max = total - int(total * 0.75) - 1
    kept = torch.zeros(3, dtype=torch.long)
    for k in base:
        v = torch.stack([(m[k] - base[k]).flatten() for m in tuned])
        st = stats["pcb"]
        clipped, beta = pcb_balance(v, st["lo"], st["hi"])
        scores = pcb_scores(beta, st["q"], st["top"])
        kept += (scores > 0).sum(1)
        merged = method.merge(
            base[k], [m[k] for m in tuned], params, mps, MergeContext(k, stats=stats)
        )
        delta = (merged - base[k]).flatten()
        some = scores.sum(0) > 0
        assert torch.all(delta[some] <= clipped.max(0).values[some] + 1e-6)
        assert torch.all(delta[some] >= clipped.min(0).values[some] - 1e-6)
        assert torch.all(delta[~some] == 0)
    assert torch.all(kept == kept_max)  # continuous random data: no ties at the threshold


def test_zero_task_vector_gets_zero_scores_and_no_nan():
    """A task that changed nothing: constant β row → min–max guard → score 0 (spec §4.6)."""
    base, tuned = _models(2, seed=5)
    tuned.append({k: v.clone() for k, v in base.items()})
    params = PCB.Params(ratio=0.3)
    mps = [PCB.ModelParams()] * 3
    st = _stats(PCB(), base, tuned, params, mps)["pcb"]
    assert st["lo"][2] == st["hi"][2] == 0
    got = _run(PCB(), base, tuned, params, mps)
    for k in base:
        v = torch.stack([(m[k] - base[k]).flatten() for m in tuned])
        _, beta = pcb_balance(v, st["lo"], st["hi"])
        scores = pcb_scores(beta, st["q"], st["top"])
        assert torch.all(scores[2] == 0) and scores[:2].any()
        assert torch.isfinite(got[k]).all()


def test_registered_with_validated_params():
    assert methods.get("pcb") is PCB
    with pytest.raises(pydantic.ValidationError):
        PCB.Params(ratio=0.0)
    with pytest.raises(pydantic.ValidationError):
        PCB.Params(clip=0.5)
    with pytest.raises(pydantic.ValidationError):
        PCB.Params(ratoi=0.1)
    with pytest.raises(pydantic.ValidationError):
        PCB.Params(inter="softmax")


def test_engine_on_disk_equals_dense_reference(tmp_path):
    """Through the engine (stat passes over sharded files, then the merge pass)."""
    params = {"ratio": 0.2, "clip": 0.02, "lambda": 1.1}
    base, fts, got = engine_merge(tmp_path, "pcb", params, weights=[0.9, 1.2])
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    ref = _reference(floats, fts, 0.2, 0.02, "pairwise", [0.9, 1.2], 1.1)
    assert list(got) == list(base)
    assert torch.equal(got["model.steps"], base["model.steps"])
    for n in floats:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
