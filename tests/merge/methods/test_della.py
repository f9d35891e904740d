"""DELLA: the MagPrune masks against a reference of the documented draw, and its statistics."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge_state_dicts
from splice.merge.base import tensor_seed


def della_ref(base, fts, densities, eps, weights, *, seed, name, rescale, ties, normalize, lam):
    """mergekit's della_magprune + GTA, drawing u ~ U[0,1) per model from splice's per-tensor
    generator (rows ranked along axis 1, rank 1 = smallest |τ|; keep where u < p)."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    taus = []
    for ft, d in zip(fts, densities, strict=True):
        tau = (ft - base).double()
        rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
        n = rows.shape[1]
        ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
        p = (d - eps) + ranks / (n - 1) * 2 * eps
        keep = (torch.rand(rows.shape, generator=gen).double() < p).double()
        kept = rows * keep
        if rescale == "paper":
            kept = kept / p
        elif rescale == "l1":
            kept = kept * rows.abs().sum() / kept.abs().sum()
        taus.append(kept.reshape(tau.shape))
    wd = torch.stack([t * w for t, w in zip(taus, weights, strict=True)])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim()).expand_as(wd)
    if ties:
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
        agree = wd.sign() == sign
        mixed, div = (wd * agree).sum(0), (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), torch.full_like(wd[0], sum(weights))
    if normalize:
        mixed = mixed / div
    return (base.double() + lam * mixed).float()


def _inputs(shape=(30, 50)):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"rescale": "l1", "lambda": 0.5},
        {"consensus": None, "normalize": False, "rescale": "off"},
    ],
)
def test_matches_the_reference_draw(params):
    base, fts = _inputs()
    dens, ws = [0.5, 0.3, 0.7], [1.0, 0.5, 0.8]
    mps = [{"density": d, "weight": w, "epsilon": 0.1} for d, w in zip(dens, ws, strict=True)]
    got = merge_state_dicts(
        "della", [{"w": f} for f in fts], base={"w": base}, params=params, model_params=mps, seed=4
    )["w"]
    ref = della_ref(
        base,
        fts,
        dens,
        0.1,
        ws,
        seed=4,
        name="w",
        rescale=params.get("rescale", "paper"),
        ties=params.get("consensus", "ties") == "ties",
        normalize=params.get("normalize", True),
        lam=params.get("lambda", 1.0),
    )
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", [(40, 300), (700,), (6, 50, 3)])
def test_equal_magnitudes_rank_by_index_as_a_stable_argsort(shape):
    """Ranks of |τ| with many ties (a few distinct magnitudes, both signs) are those of
    ``argsort(stable=True)`` along dim 1: a tie goes to the lower index, on the float32 fast
    path (sorted int64 keys) and on the others (float64; trailing dims)."""
    from splice.merge.methods.della import _rank_order

    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([0.0, 1e-3, 2e-3, 0.5])
    tau = levels[torch.randint(0, 4, shape, generator=g)] * (torch.randint(0, 2, shape) * 2 - 1)
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], tau.shape[1], -1)
    for dtype in (torch.float32, torch.float64):
        block = rows.to(dtype)
        assert torch.equal(_rank_order(block), block.abs().argsort(dim=1, stable=True))


def test_magprune_statistics():
    """Keep rate ≈ density, rising with |τ| from density − ε to density + ε; paper rescale is
    unbiased."""
    base = torch.zeros(400, 500)
    tau = torch.randn(400, 500, generator=torch.Generator().manual_seed(1))
    out = merge_state_dicts(
        "della",
        [{"w": tau}],
        base={"w": base},
        params={"consensus": None, "normalize": False},
        model_params=[{"density": 0.4, "epsilon": 0.2}],
    )["w"]
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    rank = tau.abs().argsort(dim=1).argsort(dim=1)
    low, high = kept[rank < 50].float().mean(), kept[rank >= 450].float().mean()
    assert abs(float(low) - 0.21) < 0.02 and abs(float(high) - 0.59) < 0.02
    assert abs(float((out * tau).sum() / (tau * tau).sum()) - 1) < 0.02


def test_seeded_and_density_one_is_deterministic():
    base, fts = _inputs()
    sds = [{"w": f} for f in fts]
    a = merge_state_dicts("della", sds, base={"w": base}, model_params=[{"density": 0.5}] * 3)
    b = merge_state_dicts("della", sds, base={"w": base}, model_params=[{"density": 0.5}] * 3)
    c = merge_state_dicts(
        "della", sds, base={"w": base}, model_params=[{"density": 0.5}] * 3, seed=1
    )
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    full = merge_state_dicts("della", sds, base={"w": base})["w"]  # density 1: TIES, no drop
    ties = merge_state_dicts(
        "ties", sds, base={"w": base}, params={"density": 1.0, "zero_sign": "positive"}
    )["w"]
    torch.testing.assert_close(full, ties, atol=1e-6, rtol=0)


def test_epsilon_must_keep_probabilities_inside_0_1():
    base, fts = _inputs()
    with pytest.raises(SpliceError, match="density ± epsilon"):
        merge_state_dicts(
            "della",
            [{"w": f} for f in fts],
            base={"w": base},
            model_params=[{"density": 0.9, "epsilon": 0.15}] * 3,
        )
