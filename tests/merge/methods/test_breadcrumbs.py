"""Breadcrumbs against a reference written from mergekit 0.1.5's formula (sort, window, GTA)."""

from __future__ import annotations

import pytest
import torch

from splice.merge import merge_state_dicts
from splice.merge.methods.breadcrumbs import outlier_window, rank_window_mask
from tests.merge._ckpt import finetune, tiny_llama


def breadcrumbs_ref(base, fts, densities, gammas, weights, *, ties, normalize, rescale, lam):
    """Per tensor: stable ascending sort of |τ|, keep positions [n_bot, n_bot + ⌊d·n⌋),
    optional L1 rescale, then Σ w τ̃ (÷ Σ w) or TIES election, times λ."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        taus = []
        for ft, d, g in zip(fts, densities, gammas, strict=True):
            tau = (ft[name] - b).double().flatten()
            if d < 1:
                n = tau.numel()
                target, top = int(d * n), int(g * n)
                n_bot = max(0, n - target - top)
                order = torch.sort(tau.abs(), stable=True).indices
                mask = torch.zeros(n, dtype=torch.float64)
                mask[order[n_bot : n_bot + target]] = 1
                kept = tau * mask
                if rescale and tau.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
                    kept = kept * tau.abs().sum() / kept.abs().sum()
                tau = kept
            taus.append(tau)
        wd = torch.stack([t * w for t, w in zip(taus, weights, strict=True)])
        w = torch.tensor(weights, dtype=torch.float64)[:, None].expand_as(wd)
        if ties:
            sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
            agree = wd.sign() == sign
            mixed, div = (wd * agree).sum(0), (w * agree).sum(0)
            div[div == 0] = 1
        else:
            mixed, div = wd.sum(0), torch.full_like(wd[0], sum(weights))
        if normalize:
            mixed = mixed / div
        out[name] = (b.double() + lam * mixed.reshape(b.shape)).float()
    return out


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return base, [finetune(base, s) for s in range(3)]


@pytest.mark.parametrize(
    ("params", "ties"),
    [
        ({"lambda": 0.7}, False),
        ({"rescale": True, "normalize": True}, False),
        ({"consensus": "ties"}, True),
        ({"consensus": "ties", "normalize": True, "lambda": 1.5}, True),
    ],
)
def test_matches_mergekit_formula(models, params, ties):
    base, fts = models
    dens, gams, ws = [0.6, 0.3, 1.0], [0.05, 0.2, 0.01], [0.5, 1.0, -0.3]
    mps = [{"density": d, "gamma": g, "weight": w} for d, g, w in zip(dens, gams, ws, strict=True)]
    got = merge_state_dicts("breadcrumbs", fts, base=base, params=params, model_params=mps)
    ref = breadcrumbs_ref(
        base,
        fts,
        dens,
        gams,
        ws,
        ties=ties,
        normalize=params.get("normalize", False),
        rescale=params.get("rescale", False),
        lam=params.get("lambda", 1.0),
    )
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=2e-6, rtol=0)


def test_window_keeps_exact_count_and_lowest_indices_among_ties():
    x = torch.tensor([3.0, -1.0, 1.0, 2.0, -2.0, 1.0, 5.0, 2.0, 0.5, 1.0])
    start, stop = 3, 7  # stable order of |x|: 0.5, 1,1,1,1, 2,2,2, 3, 5
    mask = rank_window_mask(x, start, stop)
    order = torch.sort(x.abs(), stable=True).indices
    want = torch.zeros(10)
    want[order[start:stop]] = 1
    assert torch.equal(mask, want)
    assert int(mask.sum()) == 4


def test_outlier_window_gives_up_outliers_to_keep_the_density():
    assert outlier_window(100, 0.9, 0.05) == (5, 95)
    assert outlier_window(100, 0.98, 0.05) == (0, 98)  # only 2 of the 5 outliers dropped
    assert outlier_window(100, 0.0, 0.05) == (95, 95)
