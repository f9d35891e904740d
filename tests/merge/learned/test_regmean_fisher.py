"""RegMean and Fisher merging: closed forms, reductions and statistics files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.merge.learned import fisher, regmean
from splice.merge.learned.regmean import shrink

from ._toys import TASKS, deltas, heads, inputs, mlp


def _linear_case(seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(6, 3).double()
    ds = {t: {"weight": torch.randn(3, 6).double(), "bias": torch.randn(3).double()} for t in TASKS}
    xs = {t: torch.randn(20, 6).double() * (i + 1) for i, t in enumerate(TASKS)}
    return layer, ds, xs


def test_regmean_on_one_linear_layer_is_the_least_squares_solution():
    layer, ds, xs = _linear_case()
    out = regmean(layer, ds, xs, alpha=1.0)
    # Independent reference: stack every task's regression problem and call lstsq.
    w0, b0 = layer.weight.detach(), layer.bias.detach()
    a_rows, y_rows = [], []
    for t in TASKS:
        x = torch.cat([xs[t], torch.ones(20, 1, dtype=torch.float64)], 1)
        a_rows.append(x)
        y_rows.append(x @ torch.cat([w0 + ds[t]["weight"], (b0 + ds[t]["bias"])[:, None]], 1).T)
    sol = torch.linalg.lstsq(torch.cat(a_rows), torch.cat(y_rows)).solution.T
    torch.testing.assert_close(out.weights["weight"], sol[:, :6], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.weights["bias"], sol[:, 6], rtol=1e-9, atol=1e-9)


def test_regmean_alpha_zero_is_a_diagonal_gram_weighted_mean():
    layer, ds, xs = _linear_case(1)
    layer.bias = None
    ds = {t: {"weight": d["weight"]} for t, d in ds.items()}
    out = regmean(layer, ds, xs, alpha=0.0)
    diag = torch.stack([(xs[t] ** 2).sum(0) for t in TASKS])  # (T, in)
    tau = torch.stack([ds[t]["weight"] for t in TASKS])  # (T, out, in)
    expect = (tau * diag[:, None, :]).sum(0) / diag.sum(0)
    torch.testing.assert_close(out.weights["weight"], layer.weight.detach() + expect)
    g = torch.randn(4, 4).double()
    assert torch.equal(shrink(g, 0.0), torch.diag(g.diagonal()))


def test_regmean_averages_non_linear_tensors_and_reports_them():
    m = mlp()
    ds = deltas(m)
    out = regmean(m, ds, inputs())
    for n in ("1.weight", "1.bias"):  # the LayerNorm: plain average
        mean = torch.stack([ds[t][n] for t in TASKS]).mean(0)
        torch.testing.assert_close(out.weights[n], dict(m.named_parameters())[n] + mean)
    assert set(out.info["averaged"]) == {"1.weight", "1.bias"}


def test_regmean_stats_round_trip_and_identity_errors(tmp_path):
    m = mlp()
    ds = deltas(m)
    first = regmean(m, ds, inputs(), stats=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{t}.gram.safetensors" for t in TASKS]
    again = regmean(m, ds, None, stats=str(tmp_path))  # no data: the files are enough
    assert again.info["stats_loaded"] == list(TASKS)
    for n, w in first.weights.items():
        torch.testing.assert_close(again.weights[n], w)
    other_base = mlp(seed=5)
    with pytest.raises(SpliceError, match="another base model") as e:
        regmean(other_base, deltas(other_base), None, stats=str(tmp_path))
    assert "\n" not in str(e.value)
    fewer = {t: {k: v for k, v in d.items() if not k.startswith("3.")} for t, d in ds.items()}
    with pytest.raises(SpliceError, match="another set of tensors"):
        regmean(m, fewer, None, stats=str(tmp_path))
    with pytest.raises(SpliceError, match="no data and no statistics file"):
        regmean(m, ds, None)


def test_fisher_with_equal_fishers_is_the_average():
    m = mlp()
    ds = deltas(m)
    same = {t: inputs()["a"] for t in TASKS}
    hs = heads()
    shared = {t: hs["a"] for t in TASKS}
    from splice.merge.learned._data import as_samples
    from splice.merge.learned._functional import Network, TaskVectors
    from splice.merge.learned.fisher import diagonal_fisher, fisher_average

    tv = TaskVectors.build(m, ds)
    net = Network(m, None, shared, tv.tasks)
    g = torch.Generator().manual_seed(0)
    one = diagonal_fisher(net, "a", tv.base, as_samples(same["a"]), 8, "predicted", "cpu", g)
    assert any(float(v.abs().sum()) > 0 for v in one.values())
    merged = fisher_average(tv, [one] * len(TASKS), 1e-6)
    for n in tv.names:
        torch.testing.assert_close(merged[n], tv.stacked[n].double().mean(0))


def test_fisher_weights_towards_the_sensitive_task(tmp_path):
    m = mlp()
    ds = deltas(m)
    out = fisher(m, ds, inputs(), heads=heads(), num_samples=6, stats=str(tmp_path))
    again = fisher(m, ds, None, heads=heads(), stats=str(tmp_path))
    for n, w in out.weights.items():
        torch.testing.assert_close(again.weights[n], w)
    with pytest.raises(SpliceError, match="another base model"):
        fisher(mlp(seed=4), deltas(mlp(seed=4)), None, heads=heads(), stats=str(tmp_path))
    with pytest.raises(SpliceError, match="has no labels"):
        fisher(m, ds, inputs(), heads=heads(), target="labels")
