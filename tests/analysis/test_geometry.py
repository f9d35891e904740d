"""Layer-update geometry (other.md §6): fits against references, the exact-diagonal case."""

from __future__ import annotations

import pytest
import torch

from splice.analysis.geometry import fit_tokenwise, layer_metrics, spearman, summarize
from splice.analysis.layer_geometry import _replace_run, geometry_study
from splice.probe import Hooks, knn_loo
from tests.probe._models import tiny_llama


def _clusters(n_per: int = 30, d: int = 8, seed: int = 0):
    """Tokens in 4 far-apart cone clusters; each cluster's transition is its own diagonal map."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(d)[:4] * 10 + 1.0
    x = torch.cat([c + 0.1 * torch.randn(n_per, d, generator=g) for c in centers]).double()
    scales = 1 + torch.rand(4, d, generator=g).double()
    y = torch.cat([x[i * n_per : (i + 1) * n_per] * scales[i] for i in range(4)])
    return x, y


def test_exact_tokenwise_diagonal_gives_zero_residual_and_cos_one():
    x, y = _clusters()
    t = fit_tokenwise(x, y, fit="diag", k=10, ridge=0.0)
    m = layer_metrics(x, y, t)
    assert m["energy"] < 1e-20
    torch.testing.assert_close(m["cos_u_t"], torch.ones(120, dtype=torch.float64))
    assert m["error"].max() < 1e-20
    # A global linear map cannot do this: its residual is far from zero.
    mg = layer_metrics(x, y, fit_tokenwise(x, y, fit="global", ridge=1e-9))
    assert mg["energy"] > 1e-4


def test_diag_fit_matches_per_coordinate_least_squares():
    torch.manual_seed(3)
    x, y = torch.randn(50, 5).double(), torch.randn(50, 5).double()
    ridge = 0.01
    t = fit_tokenwise(x, y, fit="diag", k=7, ridge=ridge)
    nb = knn_loo(x, 7)
    lam = ridge * x.pow(2).sum(1).mean() / 5
    for i in (0, 17, 49):
        xn, yn = x[nb[i]], y[nb[i]]
        a = torch.stack([(xn[:, c] @ yn[:, c]) / (xn[:, c] @ xn[:, c] + lam) for c in range(5)])
        torch.testing.assert_close(t[i], a * x[i])


def test_rank_fit_recovers_a_low_rank_map_and_not_below_its_rank():
    torch.manual_seed(4)
    x = torch.randn(80, 6).double()
    b = torch.randn(6, 2).double() @ torch.randn(2, 6).double()
    y = x @ b
    t2 = fit_tokenwise(x, y, fit="rank", rank=2, k=12, ridge=1e-10)
    torch.testing.assert_close(t2, y, rtol=1e-5, atol=1e-6)
    t1 = fit_tokenwise(x, y, fit="rank", rank=1, k=12, ridge=1e-10)
    assert (t1 - y).norm() / y.norm() > 0.05


def test_global_fit_is_exact_leave_one_out():
    torch.manual_seed(5)
    x, y = torch.randn(30, 4).double(), torch.randn(30, 4).double()
    t = fit_tokenwise(x, y, fit="global", ridge=0.1)
    lam = 0.1 * x.pow(2).sum(1).mean()
    for i in (0, 11):
        keep = torch.arange(30) != i
        xa, ya = x[keep], y[keep]
        a = torch.linalg.solve(xa.T @ xa + lam * torch.eye(4, dtype=x.dtype), xa.T @ ya)
        torch.testing.assert_close(t[i], x[i] @ a)


def test_update_target_is_on_the_transition_scale():
    x, y = _clusters()
    t = fit_tokenwise(x, y, fit="diag", k=10, ridge=0.0, target="update")
    torch.testing.assert_close(t, y)


def test_in_sample_fit_memorises_and_leave_one_out_does_not():
    torch.manual_seed(6)
    x, y = torch.randn(40, 5).double(), torch.randn(40, 5).double()
    own = fit_tokenwise(x, y, fit="diag", k=1, ridge=0.0, leave_one_out=False)
    torch.testing.assert_close(own, y)  # its own neighbourhood: y_c / x_c exactly
    assert (fit_tokenwise(x, y, fit="diag", k=1, ridge=0.0) - y).norm() > 0.5 * y.norm()
    # k > 1: the token plus its k − 1 nearest others, in the per-coordinate closed form
    t = fit_tokenwise(x, y, fit="diag", k=4, ridge=0.0, leave_one_out=False)
    nb = knn_loo(x, 3)
    for i in (0, 21):
        rows = torch.cat([torch.tensor([i]), nb[i]])
        a = (x[rows] * y[rows]).sum(0) / x[rows].pow(2).sum(0)
        torch.testing.assert_close(t[i], a * x[i])


def test_metrics_by_hand():
    x = torch.zeros(3, 2).double()
    y = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]).double()
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]).double()
    m = layer_metrics(x, y, t)
    torch.testing.assert_close(m["cos_u_t"], torch.tensor([2**-0.5, 1.0, 1.0]).double())
    torch.testing.assert_close(m["angle_u_t"][0], torch.tensor(45.0).double())
    torch.testing.assert_close(m["cos_y_r"], torch.tensor([2**-0.5, 0.0, 1.0]).double())
    torch.testing.assert_close(m["error"], torch.tensor([0.5, 0.0, 4 / 9]).double())
    torch.testing.assert_close(m["energy"], torch.tensor(5 / 15).double())
    assert int(m["subspace_dim"]) == 2  # tᵘ spans both axes with 5:1 energy split < 90 %
    s = summarize(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s == {"mean": 3.0, "median": 3.0, "iqr": 2.0}


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): d² = 4, ρ = 1 − 6·4/(4·15) = 0.6
    assert spearman([1, 2, 3, 4], [5, 1, 9, 7]) == pytest.approx(0.6)


def test_study_on_tiny_llama_and_exact_replacement_is_a_no_op():
    model = tiny_llama(layers=4, hidden=32)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # padding is left out
    batches = [{"input_ids": ids, "attention_mask": mask}]
    seen = []
    rep = geometry_study(model, batches, [0, 1, 2, 3], k=8, on_layer=seen.append)
    assert seen == [0, 1, 2, 3] and rep["tokens"] == 55 and rep["output_change"] == "kl"
    for row in rep["layers"].values():
        assert row["output_change"]["mean"] >= 0 and -1 <= row["rho"] <= 1
        assert row["energy"] > 0 and -1 <= row["cos_u_t"]["mean"] <= 1
    assert rep["rho_across"] is not None
    with torch.no_grad(), Hooks(model) as h:
        cap = h.capture(2)
        clean = model(**batches[0]).logits
    exact = cap[2][mask.bool()]
    change = _replace_run(model, batches, [mask.bool()], [clean], 2, exact, True)
    assert change.shape == (55,) and change.abs().max() < 1e-10


def test_centred_fit_is_translation_equivariant():
    torch.manual_seed(6)
    x, y = torch.randn(60, 5).double(), torch.randn(60, 5).double()
    t = fit_tokenwise(x, y, fit="diag", k=9, center=True)
    c, c2 = torch.randn(5).double() * 10, torch.randn(5).double() * 10
    moved = fit_tokenwise(x + c, y + c2, fit="diag", k=9, center=True)
    torch.testing.assert_close(moved, t + c2)
    assert (fit_tokenwise(x + c, y + c2, fit="diag", k=9) - (t + c2)).abs().max() > 1e-3
