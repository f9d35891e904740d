"""DARE (merging.md §3): masks from the per-tensor RNG, rescale, unbiasedness, consensus
(DARE+TIES: the full TIES trim after the drop, as MergeLM / FusionBench)."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge_state_dicts
from splice.merge.base import tensor_seed
from tests.merge._ckpt import finetune, tiny_llama
from tests.merge.methods.test_ties import ties_paper


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return base, [finetune(base, s) for s in range(3)]


def _dropped(base, models, name, p, seed, rescale="paper"):
    """τ̃_t for one tensor: one generator per (seed, name), drawn model after model."""
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    out = []
    for m in models:
        tau = (m[name] - base[name]).flatten()
        keep = ~(torch.rand(tau.numel(), generator=g) < p)
        kept = tau * keep
        if rescale == "paper":
            kept = kept / (1 - p)
        elif rescale == "l1":
            kept = kept * (tau.abs().sum() / kept.abs().sum())
        out.append(kept.reshape(base[name].shape))
    return out


def test_linear_consensus_matches_drop_then_sum(models):
    base, fts = models
    weights = [1.0, 0.5, 2.0]
    got = merge_state_dicts(
        "dare",
        fts,
        base=base,
        params={"lambda": 0.7},
        model_params=[{"p": 0.4, "weight": w} for w in weights],
        seed=3,
    )
    for n, b in base.items():
        if b.is_floating_point():
            taus = _dropped(base, fts, n, 0.4, 3)
            ref = b + 0.7 * sum(w * t for w, t in zip(weights, taus, strict=True))
            torch.testing.assert_close(got[n], ref, atol=1e-6, rtol=0)


def test_ties_consensus_and_l1_rescale_match_mergekit_dare_ties(models):
    base, fts = models
    params = {"consensus": "ties", "rescale": "l1", "aggregate": "sum", "zero_sign": "positive"}
    params["trim"] = 1.0  # mergekit's dare_ties has no TIES trim
    got = merge_state_dicts("dare", fts, base=base, params={**params, "p": 0.5}, seed=1)
    for n, b in base.items():
        if b.is_floating_point():
            taus = _dropped(base, fts, n, 0.5, 1, rescale="l1")
            sign = torch.where(sum(taus) >= 0, 1.0, -1.0)
            ref = b + sum(torch.where(t.sign() == sign, t, 0) for t in taus)
            torch.testing.assert_close(got[n], ref, atol=1e-6, rtol=0)


def test_ties_consensus_runs_the_full_ties_trim_after_the_drop(models):
    """MergeLM / FusionBench DARE+TIES (Errata of merging.md §3.4): θ̃_t = θ₀ + DARE(τ_t), then
    TIES on them — the global top-20 % trim of each τ̃_t, sign election, disjoint mean."""
    base, fts = models
    got = merge_state_dicts("dare", fts, base=base, params={"p": 0.3, "consensus": "ties"}, seed=2)
    floats = [n for n, b in base.items() if b.is_floating_point()]
    dropped = [{} for _ in fts]
    for n in floats:
        for d, tau in zip(dropped, _dropped(base, fts, n, 0.3, 2), strict=True):
            d[n] = base[n] + tau
    ref = ties_paper({n: base[n] for n in floats}, dropped, 0.2)
    for n in floats:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=0)
    # the trim matters: without it (mergekit's dare_ties) the result differs
    untrimmed = merge_state_dicts(
        "dare", fts, base=base, params={"p": 0.3, "consensus": "ties", "trim": 1.0}, seed=2
    )
    assert not torch.allclose(untrimmed["lm_head.weight"], got["lm_head.weight"])


def test_ties_consensus_trim_per_tensor_keeps_the_top_of_each_dropped_tensor(models):
    base, fts = models
    params = {"p": 0.5, "consensus": "ties", "trim": 0.4, "scope": "tensor"}
    got = merge_state_dicts("dare", fts, base=base, params={**params, "zero_sign": "positive"})
    for n, b in base.items():
        if b.is_floating_point():
            taus = []
            for tau in _dropped(base, fts, n, 0.5, 0):
                flat = tau.flatten()
                keep = max(1, int(0.4 * flat.numel()))
                thr = torch.kthvalue(flat.abs(), flat.numel() - keep + 1).values
                taus.append(torch.where(tau.abs() >= thr, tau, 0))
            sign = torch.where(sum(taus) >= 0, 1.0, -1.0)
            agree = [torch.where(t.sign() == sign, t, 0) for t in taus]
            count = sum((a != 0).float() for a in agree).clamp_min(1)
            torch.testing.assert_close(got[n], b + sum(agree) / count, atol=1e-6, rtol=0)
    with pytest.raises(SpliceError, match="trim needs consensus: ties"):
        merge_state_dicts("dare", fts, base=base, params={"p": 0.5, "trim": 0.2})


def test_p_zero_is_task_arithmetic(models):
    base, fts = models
    dare = merge_state_dicts("dare", fts, base=base, params={"p": 0.0, "lambda": 0.3})
    ta = merge_state_dicts("task_arithmetic", fts, base=base, params={"lambda": 0.3})
    assert all(torch.equal(dare[n], ta[n]) for n in base)


def test_unbiased_over_seeds(models):
    base, fts = models
    name = "model.layers.1.mlp.up_proj.weight"
    small = {k: v for k, v in base.items() if k == name}
    ft = {name: fts[0][name]}
    runs = torch.stack(
        [
            merge_state_dicts("dare", [ft], base=small, params={"p": 0.5}, seed=s)[name]
            for s in range(400)
        ]
    )
    tau = ft[name] - small[name]
    mean_tau = runs.mean(0) - small[name]
    # each entry is tau·Bernoulli(0.5)/0.5: std of the mean over 400 runs = |tau|/20
    assert (mean_tau - tau).abs().max() < 5 * tau.abs().max() / 20
    dropped = (runs - small[name] == 0).float().mean()
    assert abs(float(dropped) - 0.5) < 0.02


def test_same_seed_same_result_other_seed_differs(models):
    base, fts = models
    a = merge_state_dicts("dare", fts, base=base, params={"p": 0.9}, seed=0)
    b = merge_state_dicts("dare", fts, base=base, params={"p": 0.9}, seed=0)
    c = merge_state_dicts("dare", fts, base=base, params={"p": 0.9}, seed=1)
    n = "lm_head.weight"
    assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])


def test_drop_everything_returns_the_base(models):
    base, fts = models
    got = merge_state_dicts("dare", fts, base=base, params={"p": 1.0})
    assert all(torch.equal(got[n], base[n]) for n in base)
