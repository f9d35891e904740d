"""TIES against loop-based references written from merging.md §2.3 and mergekit's ties."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge_state_dicts
from tests.merge._ckpt import finetune, tiny_llama


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def ties_paper(base, models, density, lam=1.0):
    """The official code's semantics, entry by entry: global trim, mass sign, majority, dis-mean.

    Trim keeps floor(density·P) entries per task (splice's count; see keep_count).
    """
    names = sorted(k for k in base if base[k].is_floating_point())
    taus = [torch.cat([(m[n] - base[n]).double().flatten() for n in names]) for m in models]
    P = taus[0].numel()
    keep = max(1, int(density * P))
    trimmed = []
    for tau in taus:
        thr = torch.kthvalue(tau.abs(), P - keep + 1).values
        trimmed.append([float(v) if abs(v) >= thr else 0.0 for v in tau.tolist()])
    gammas = [_sign(sum(t[j] for t in trimmed)) for j in range(P)]
    majority = 1 if sum(gammas) >= 0 else -1
    merged = []
    for j in range(P):
        g = gammas[j] or majority
        agree = [t[j] for t in trimmed if _sign(t[j]) == g]
        merged.append(sum(agree) / max(1, len(agree)))
    merged = torch.tensor(merged, dtype=torch.float64)
    out, pos = {}, 0
    for n in names:
        k = base[n].numel()
        out[n] = (base[n].double() + lam * merged[pos : pos + k].reshape(base[n].shape)).float()
        pos += k
    return out


def ties_mergekit(base, models, densities, weights, lam=1.0, normalize=True):
    """mergekit's ties per tensor: argsort top-k, sum ≥ 0 → +, weighted disjoint mean."""
    out = {}
    for n, b in base.items():
        if not b.is_floating_point():
            continue
        deltas = []
        for m, d, w in zip(models, densities, weights, strict=True):
            tau = (m[n] - b).flatten()
            k = max(1, int(d * tau.numel())) if d < 1 else tau.numel()
            mask = torch.zeros_like(tau)
            mask[torch.argsort(tau.abs(), descending=True)[:k]] = 1
            deltas.append(tau * mask * w)
        total = sum(deltas)
        sign = torch.where(total >= 0, 1.0, -1.0)
        num = sum(torch.where(d.sign() == sign, d, 0) for d in deltas)
        den = sum(
            torch.where(d.sign() == sign, w, 0.0) for d, w in zip(deltas, weights, strict=True)
        )
        den = torch.where(den == 0, 1.0, den)
        mixed = num / den if normalize else num
        out[n] = b + lam * mixed.reshape(b.shape)
    return out


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return base, [finetune(base, s) for s in range(3)]


def _close(a, b, atol=1e-6):
    for n in b:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0)


def test_global_scope_matches_the_papers_code(models):
    base, fts = models
    got = merge_state_dicts("ties", fts, base=base, params={"density": 0.3, "lambda": 0.7})
    _close(got, ties_paper(base, fts, 0.3, lam=0.7))


def test_tensor_scope_matches_mergekit(models):
    base, fts = models
    params = {"scope": "tensor", "zero_sign": "positive", "lambda": 1.3}
    mps = [{"density": 0.5, "weight": 0.5}, {"density": 0.3, "weight": 1.0}, {"density": 0.8}]
    got = merge_state_dicts("ties", fts, base=base, params=params, model_params=mps)
    _close(got, ties_mergekit(base, fts, [0.5, 0.3, 0.8], [0.5, 1.0, 1.0], lam=1.3))


def test_sum_aggregate_is_mergekit_normalize_false(models):
    base, fts = models
    params = {"scope": "tensor", "zero_sign": "positive", "aggregate": "sum", "density": 0.4}
    got = merge_state_dicts("ties", fts, base=base, params=params)
    _close(got, ties_mergekit(base, fts, [0.4] * 3, [1.0] * 3, normalize=False))


def test_density_one_without_sign_conflict_is_task_arithmetic(models):
    base, _ = models
    g = torch.Generator().manual_seed(5)
    # every model moves each entry in the same direction: no sign conflict
    direction = {k: torch.randn(v.shape, generator=g).sign() for k, v in base.items()}
    fts = [
        {
            k: v + direction[k] * torch.rand(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    ties_sum = merge_state_dicts(
        "ties", fts, base=base, params={"density": 1.0, "aggregate": "sum", "lambda": 0.4}
    )
    ta = merge_state_dicts("task_arithmetic", fts, base=base, params={"lambda": 0.4})
    _close(ties_sum, ta, atol=1e-6)
    ties_mean = merge_state_dicts("ties", fts, base=base, params={"density": 1.0})
    ta_mean = merge_state_dicts("task_arithmetic", fts, base=base, params={"normalize": True})
    _close(ties_mean, ta_mean, atol=1e-6)


def test_merging_a_model_with_itself_returns_it(models):
    base, fts = models
    got = merge_state_dicts("ties", [fts[0]] * 3, base=base, params={"density": 1.0})
    _close(got, fts[0])
    assert torch.equal(got["model.steps"], base["model.steps"])


def test_majority_sign_breaks_exact_cancellations():
    base = {"w": torch.zeros(6)}
    a = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.5, 4.0])
    b = torch.tensor([-1.0, -2.0, 3.0, -0.5, 0.5, 4.0])
    # entries 0, 3, 4 cancel exactly; the model-wide majority of elected signs is +
    fts = [{"w": a}, {"w": b}]
    got = merge_state_dicts("ties", fts, base=base, params={"density": 1.0})["w"]
    assert got.tolist() == [1.0, -2.0, 3.0, 0.5, 0.5, 4.0]
    neg = merge_state_dicts("ties", [{"w": -a}, {"w": -b}], base=base, params={"density": 1.0})
    assert neg["w"].tolist() == [-1.0, 2.0, -3.0, -0.5, -0.5, -4.0]
    pos = merge_state_dicts(
        "ties", [{"w": -a}, {"w": -b}], base=base, params={"density": 1.0, "zero_sign": "positive"}
    )
    assert pos["w"].tolist() == [1.0, 2.0, -3.0, 0.5, 0.5, -4.0]


def test_max_aggregate_takes_the_largest_agreeing_entry():
    base = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, -1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0, -5.0])}]
    got = merge_state_dicts("ties", fts, base=base, params={"density": 1.0, "aggregate": "max"})
    assert got["w"].tolist() == [3.0, 2.0, -5.0]


def test_global_scope_refuses_per_layer_density(models):
    base, fts = models
    with pytest.raises(SpliceError, match="scope: tensor"):
        merge_state_dicts(
            "ties",
            fts,
            base=base,
            params={"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]},
        )
