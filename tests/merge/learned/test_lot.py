"""LOT Merging (merging.md §9): closed forms against independent least-squares solves."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from splice.merge.learned.lot import lot, lot_solve

from ._toys import TASKS, deltas, inputs, merged_copy, mlp


def _rows(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def test_linear_closed_form_equals_an_independent_least_squares_solve():
    module = mlp()
    ds, x = deltas(module), inputs(n=30)
    out = lot(module, ds, x)
    # first layer: its inputs in every expert are the raw inputs
    design = torch.cat([_rows(x[t]) for t in TASKS])
    target = torch.cat(
        [_rows(x[t]) @ torch.cat([ds[t]["0.weight"], ds[t]["0.bias"][:, None]], 1).T for t in TASKS]
    )
    sol = torch.linalg.lstsq(design, target).solution.T  # (out, in + 1)
    base = module.state_dict()
    torch.testing.assert_close(out.weights["0.weight"] - base["0.weight"], sol[:, :5])
    torch.testing.assert_close(out.weights["0.bias"] - base["0.bias"], sol[:, 5])
    # last layer: inputs recorded inside each expert with a hook of our own
    design, target = [], []
    for t in TASKS:
        expert = merged_copy(module, {n: base[n] + ds[t][n] for n in base})
        with torch.no_grad():
            h = expert[:3](x[t])
        design.append(_rows(h))
        target.append(_rows(h) @ torch.cat([ds[t]["3.weight"], ds[t]["3.bias"][:, None]], 1).T)
    sol = torch.linalg.lstsq(torch.cat(design), torch.cat(target)).solution.T
    torch.testing.assert_close(out.weights["3.weight"] - base["3.weight"], sol[:, :7])
    assert out.info["solved"] == {"linear": 4, "norm": 2, "shift": 0, "mean": 0}


def test_layernorm_scale_is_the_per_feature_weighted_least_squares_optimum():
    module = mlp()
    ds, x = deltas(module), inputs(n=30)
    out = lot(module, ds, x)
    base = module.state_dict()
    num = torch.zeros(7, dtype=torch.float64)
    den = torch.zeros(7, dtype=torch.float64)
    for t in TASKS:
        expert = merged_copy(module, {n: base[n] + ds[t][n] for n in base})
        with torch.no_grad():
            xh = F.layer_norm(expert[0](x[t]), (7,))  # normalised input, no affine
        num += ds[t]["1.weight"] * xh.pow(2).sum(0)
        den += xh.pow(2).sum(0)
        # per feature j: argmin_g Σ_t ‖x̂_j (g − γ_tj)‖² → Σ_t γ_tj S_tj / Σ_t S_tj
    torch.testing.assert_close(out.weights["1.weight"] - base["1.weight"], num / den)
    shift = sum(ds[t]["1.bias"] for t in TASKS) / 3  # equal row counts: plain mean
    torch.testing.assert_close(out.weights["1.bias"] - base["1.bias"], shift)


def _drift(module, weights, ds, x) -> float:
    """Σ_t ‖f_merged(X_t) − f_t(X_t)‖² at the output."""
    base = module.state_dict()
    merged = merged_copy(module, weights)
    total = 0.0
    with torch.no_grad():
        for t in TASKS:
            expert = merged_copy(module, {n: base[n] + ds[t][n] for n in base})
            total += float((merged(x[t]) - expert(x[t])).pow(2).sum())
    return total


def test_lot_reduces_feature_drift_versus_task_arithmetic():
    module = mlp()
    ds, x = deltas(module), inputs(n=40)
    out = lot(module, ds, x)
    base = module.state_dict()
    lot_drift = _drift(module, out.weights, ds, x)
    for lam in (0.3, 1 / 3, 0.5, 1.0):
        ta = {n: base[n] + lam * sum(ds[t][n] for t in TASKS) for n in base}
        assert lot_drift < _drift(module, ta, ds, x)


def test_single_task_returns_its_model_and_equal_grams_return_the_mean():
    module = mlp()
    ds, x = deltas(module), inputs(n=40)
    one = lot(module, {"a": ds["a"]}, {"a": x["a"]})
    for n, p in module.state_dict().items():
        torch.testing.assert_close(one.weights[n], p + ds["a"][n])
    g = torch.randn(6, 6, dtype=torch.float64)
    gram = g @ g.T + torch.eye(6, dtype=torch.float64)
    taus = [torch.randn(3, 6, dtype=torch.float64) for _ in range(4)]
    sol = lot_solve(sum(t @ gram for t in taus), 4 * gram)
    torch.testing.assert_close(sol, sum(taus) / 4)
    ridge = lot_solve(sum(t @ gram for t in taus), 4 * gram, ridge=1e-9)
    torch.testing.assert_close(ridge, sum(taus) / 4)


def test_perturbing_the_conv_solution_never_lowers_the_drift():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()).double()
    ds = deltas(module, seed=4)
    x = {t: torch.randn(4, 2, 5, 5, dtype=torch.float64) for t in TASKS}
    out = lot(module, ds, x)

    def objective(dw: torch.Tensor, db: torch.Tensor) -> float:  # conv outputs, no unfolding
        return sum(
            float(
                (F.conv2d(x[t], dw - ds[t]["0.weight"], db - ds[t]["0.bias"], padding=1))
                .pow(2)
                .sum()
            )
            for t in TASKS
        )

    base = module.state_dict()
    dw, db = out.weights["0.weight"] - base["0.weight"], out.weights["0.bias"] - base["0.bias"]
    best = objective(dw, db)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        pw = 1e-3 * torch.randn(dw.shape, generator=g, dtype=dw.dtype)
        pb = 1e-3 * torch.randn(db.shape, generator=g, dtype=db.dtype)
        assert objective(dw + pw, db + pb) >= best


def test_row_mask_keeps_padding_out_of_the_statistics():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3)).double()
    ds = deltas(module, seed=2)
    seqs = {t: torch.randn(6, 5, 4, dtype=torch.float64) for t in TASKS}  # (B, L, dim)
    lengths = torch.tensor([5, 3, 4, 1, 2, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    padded = {t: torch.where(mask[..., None], s, 99.0) for t, s in seqs.items()}

    class Batch:  # a prepared split: batch(idx) → {"x", "mask"}
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def batch(self, i, device):
            return {"x": self.x[torch.as_tensor(i)], "mask": mask[torch.as_tensor(i)]}

    got = lot(
        module, ds, {t: Batch(p) for t, p in padded.items()},
        forward=lambda m, b: m(b["x"]), rows=lambda b: b["mask"],
    )  # fmt: skip
    flat = {t: s[mask] for t, s in seqs.items()}  # only the real tokens, as rows
    ref = lot(module, ds, flat)
    for n in ref.weights:
        torch.testing.assert_close(got.weights[n], ref.weights[n])
