"""Coordinate check and HP-transfer diagnostics (other.md §8.4) on a from-scratch MLP family."""

from __future__ import annotations

import math

import pytest
import torch

from splice.analysis.coord_check import plot_coord_check, record_sizes, slopes
from splice.analysis.hp_transfer import (
    fit_power_law,
    optimum,
    plot_sweep,
    shift_in_steps,
    transfer_report,
)
from splice.analysis.mup_models import MLP
from splice.train.mup_runs import coord_check, lr_sweep

NAMES = ["embed", "layers.0", "layers.1", "readout"]


def digits():
    """scikit-learn's bundled 8×8 digits (offline): train indices, features, labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return perm[:1400], x, y


def run_kwargs():
    train, x, y = digits()

    def batch(i):
        idx = train[torch.randint(0, 1400, (64,), generator=torch.Generator().manual_seed(i))]
        return x[idx], y[idx]

    def evaluate(model):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x[train]), y[train]).item()

    kw = {"batch": batch, "loss": torch.nn.functional.cross_entropy}
    return kw, evaluate, x[train[:64]]


def factory(width):
    return MLP(64, width, 10, depth=3)


def test_coordinate_check_flat_under_mup_and_drifting_under_sp(tmp_path):
    torch.set_num_threads(1)
    kw, _, probe = run_kwargs()
    tables = {}
    for p in ("mup", "sp"):
        tables[p] = coord_check(
            factory,
            [32, 64, 128, 256, 512],
            NAMES,
            probe=probe,
            base=32,
            delta=64,
            lr=2**-8,
            parametrization=p,
            **kw,
        )
    mu, sp = slopes(tables["mup"]), slopes(tables["sp"])
    assert set(mu) == {0, 1, 2, 3}
    assert max(abs(s) for step in mu.values() for s in step.values()) < 0.1
    # SP: the readout shrinks with width at init and grows after training steps
    assert sp[0]["readout"] < -0.3
    assert min(sp[step]["readout"] for step in (1, 2, 3)) > 0.25
    # the slope assertion that passes for μP fails for SP
    assert max(abs(s) for step in sp.values() for s in step.values()) >= 0.1
    assert plot_coord_check(tables, tmp_path / "coord.png").stat().st_size > 10_000


def test_record_sizes_and_slopes_by_hand():
    model = MLP(2, 4, 1, depth=2)
    x = torch.ones(3, 2)
    sizes = record_sizes(model, x, ["embed"])
    assert sizes["embed"] == pytest.approx(model.embed(x).abs().mean().item())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # removed
    table = {w: {0: {"a": 3.0 * w**0.5, "b": 7.0}} for w in (8, 16, 64)}
    s = slopes(table)
    assert s[0]["a"] == pytest.approx(0.5) and s[0]["b"] == pytest.approx(0.0, abs=1e-12)


def test_optimum_refines_a_parabola_in_log_lr():
    lrs = [2.0**k for k in range(-10, -1)]
    star = 2.0**-5.3
    losses = {lr: 1.0 + 0.2 * (math.log(lr) - math.log(star)) ** 2 for lr in lrs}
    lr, loss = optimum(losses)
    assert lr == pytest.approx(star, rel=1e-6) and loss == pytest.approx(1.0)
    losses[2.0**-2] = math.inf  # a diverged run is ignored
    assert optimum(losses)[0] == pytest.approx(star, rel=1e-6)
    edge = {lr: -math.log(lr) for lr in lrs}  # no interior optimum: the grid's best
    assert optimum(edge) == (2.0**-2, pytest.approx(-math.log(2.0**-2)))
    with pytest.raises(ValueError, match="diverged"):
        optimum({0.1: math.inf})
    assert shift_in_steps(2.0**-5, 2.0**-7, lrs) == pytest.approx(2.0)


def test_power_law_fits():
    ns = [64, 128, 256, 512, 1024]
    fit = fit_power_law(ns, [0.3 + 5 * n**-0.7 for n in ns], offset=True)
    assert fit["p"] == pytest.approx(0.7, rel=0.03) and fit["c"] == pytest.approx(0.3, abs=0.01)
    fit = fit_power_law(ns, [2 * n**-0.5 for n in ns], offset=False)
    assert fit["p"] == pytest.approx(0.5) and fit["A"] == pytest.approx(2.0)


def test_transfer_report_on_synthetic_grids(tmp_path):
    """η*_n = η*_∞ · (1 + n^-κ), L_n = 1 + n^-b, target 1024: fast iff 2κ > b."""
    lrs = [2.0**k for k in range(-12, -1)]
    ns = [64, 128, 256, 512, 1024]

    def grids(kappa, b):
        out = {}
        for n in ns:
            star = math.log(2.0**-6) + 3 * n**-kappa
            out[n] = {lr: 1 + n**-b + 0.1 * (math.log(lr) - star) ** 2 for lr in lrs}
        return out

    fast = transfer_report(grids(kappa=0.8, b=0.5), 1024)
    slow = transfer_report(grids(kappa=0.1, b=0.5), 1024)
    assert fast["fast_transfer"] and not slow["fast_transfer"]
    assert fast["gap_fit"]["p"] == pytest.approx(0.5, rel=0.05)
    assert fast["kappa"] == pytest.approx(0.8, rel=0.25)
    assert fast["S"][64] > fast["S"][512] >= 0 and fast["G"][64] > fast["G"][512] > 0
    assert fast["compute"]["direct"] == 11 * 1024**2
    assert fast["compute"]["transfer"][64] == 11 * 64**2 + 1024**2
    assert plot_sweep({"a": grids(0.8, 0.5)}, tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.slow
def test_lr_transfer_64_to_1024_mup_stable_sp_shifts():
    """The §8.5 validation on digits, Adam, 30 steps, 2 seeds (about a minute on 2 cores)."""
    torch.set_num_threads(1)
    kw, evaluate, _ = run_kwargs()
    lrs = [2.0**k for k in range(-13, -1)]
    shift = {}
    for p in ("mup", "sp"):
        grid = lr_sweep(
            factory,
            [64, 128, 256, 512, 1024],
            lrs,
            evaluate=evaluate,
            base=64,
            delta=128,
            steps=30,
            parametrization=p,
            readout_zero_init=True,
            seeds=(0, 1),
            **kw,
        )
        shift[p] = transfer_report(grid, 1024)["max_shift_steps"]
    assert shift["mup"] <= 1.0
    assert shift["sp"] >= 2.0
