"""DARE (merging.md §3): masks from the per-tensor RNG, rescale, unbiasedness, consensus."""

from __future__ import annotations

import pytest
import torch

from splice.merge import merge_state_dicts
from splice.merge.base import tensor_seed
from tests.merge._ckpt import finetune, tiny_llama


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
    got = merge_state_dicts("dare", fts, base=base, params={**params, "p": 0.5}, seed=1)
    for n, b in base.items():
        if b.is_floating_point():
            taus = _dropped(base, fts, n, 0.5, 1, rescale="l1")
            sign = torch.where(sum(taus) >= 0, 1.0, -1.0)
            ref = b + sum(torch.where(t.sign() == sign, t, 0) for t in taus)
            torch.testing.assert_close(got[n], ref, atol=1e-6, rtol=0)


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
