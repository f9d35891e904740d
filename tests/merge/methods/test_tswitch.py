"""T-Switch / Auto-Switch (spec merging.md §12, reconstructed): switches, storage, composition."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from splice.deltas import Delta, Switch, load_deltas, save_deltas
from splice.errors import SpliceError
from splice.merge.base import MergeContext, methods
from splice.merge.methods.tswitch import (
    TSwitch,
    auto_switch_weights,
    switch_approx,
    switch_delta,
    tswitch_compose,
    tswitch_compress,
)
from tests.merge._engine_run import direct_merge, engine_merge


def _reference(tau, density):
    """Element loop: keep |τ| ≥ k-th largest |τ| (k = max(1, ⌊qP⌋), zeros never), κ = mean."""
    flat = tau.flatten().tolist()
    k = max(1, int(density * len(flat)))
    threshold = sorted((abs(x) for x in flat), reverse=True)[k - 1]
    kept = [i for i, x in enumerate(flat) if abs(x) >= threshold and x != 0]
    kappa = sum(abs(flat[i]) for i in kept) / len(kept)
    out = [0.0] * len(flat)
    for i in kept:
        out[i] = kappa if flat[i] > 0 else -kappa
    return torch.tensor(out).reshape(tau.shape), len(kept), kappa


@pytest.mark.parametrize(("shape", "density"), [((13, 7), 0.1), ((50,), 0.5), ((4, 3, 5), 1.0)])
def test_switch_matches_element_loop_reference(shape, density):
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    tau.view(-1)[3] = 0.0
    ref, count, kappa = _reference(tau, density)
    sw = switch_delta(tau, density)
    assert sw.count == count and sw.shape == tau.shape
    assert sw.scale.item() == pytest.approx(kappa, rel=1e-6)
    torch.testing.assert_close(sw.materialize(), ref)
    torch.testing.assert_close(switch_approx(tau, density), ref)


def test_scale_is_the_least_squares_optimum_and_error_is_bounded():
    """κ = mean|τ| on M minimises ‖τ − κ M⊙S‖²; the error is exactly ‖τ‖² − |M|κ² ≤ ‖τ‖²."""
    tau = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for density in (0.05, 0.3, 1.0):
        sw = switch_delta(tau, density)
        approx = sw.materialize(torch.float64)
        err = (tau - approx).square().sum()
        kappa = sw.scale.double().squeeze()
        torch.testing.assert_close(err, tau.square().sum() - sw.count * kappa.square())
        assert err <= tau.square().sum()
        unit = approx / kappa
        for factor in (0.9, 1.1):
            assert (tau - factor * kappa * unit).square().sum() > err
    full = switch_delta(tau, 1.0)  # q = 100 %: the least-squares 1-bit approximation
    assert full.count == 400
    assert full.scale.item() == pytest.approx(tau.abs().mean().item(), rel=1e-6)


@pytest.mark.parametrize(("density", "encoding"), [(0.5, "bitmap"), (0.01, "indices")])
def test_storage_accounting_matches_bit_counts(density, encoding):
    tau = torch.randn(64, 50, generator=torch.Generator().manual_seed(2))
    sw = switch_delta(tau, density)
    numel, count = tau.numel(), sw.count
    assert count == int(density * numel)
    support = math.ceil(numel / 8) if encoding == "bitmap" else 4 * count
    assert sw.nbytes == support + math.ceil(count / 8) + 4
    assert (sw.bitmap is not None) == (encoding == "bitmap")
    assert sw.nbytes == min(math.ceil(numel / 8), 4 * count) + math.ceil(count / 8) + 4
    assert sw.nbytes < numel * 4 / 10


def test_switches_round_trip_through_save_and_load(tmp_path):
    g = torch.Generator().manual_seed(3)
    deltas = {
        "dense.weight": switch_delta(torch.randn(32, 16, generator=g), 0.3),
        "sparse.weight": switch_delta(torch.randn(200, 40, generator=g), 0.005),
        "half.bias": switch_delta(torch.randn(9, generator=g).bfloat16(), 0.5),
    }
    path = save_deltas(deltas, tmp_path / "task.safetensors")
    loaded = load_deltas(path)
    assert set(loaded) == set(deltas)
    for name, sw in deltas.items():
        back = loaded[name]
        assert isinstance(back, Switch) and back.count == sw.count
        assert back.materialize().dtype == sw.materialize().dtype
        assert torch.equal(back.materialize(), sw.materialize())
        assert back.nbytes == sw.nbytes
    assert loaded["half.bias"].materialize().dtype == torch.bfloat16
    assert Delta._kinds["switch"] is Switch


def test_compress_then_compose_equals_the_static_merge_method():
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 5, generator=g), "pos": torch.arange(6)}
    tuned = [{"w": base["w"] + torch.randn(6, 5, generator=g), "pos": base["pos"]} for _ in "ab"]
    switches = [tswitch_compress(base, t, density=0.2) for t in tuned]
    assert set(switches[0]) == {"w"}  # int buffers are not task vectors
    composed = dict(tswitch_compose(base, switches, [0.6, 0.9]))
    assert torch.equal(composed["pos"], base["pos"])
    params = TSwitch.Params(density=0.2, **{"lambda": 0.5})
    mps = [TSwitch.ModelParams(weight=1.2), TSwitch.ModelParams(weight=1.8)]
    merged = TSwitch().merge(base["w"], [t["w"] for t in tuned], params, mps, MergeContext("w"))
    torch.testing.assert_close(merged, composed["w"])
    expect = base["w"] + sum(
        w * _reference(t["w"] - base["w"], 0.2)[0] for w, t in zip((0.6, 0.9), tuned, strict=True)
    )
    torch.testing.assert_close(composed["w"], expect)


def test_compose_one_task_reconstructs_that_task():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, generator=g)}
    tuned = {"w": base["w"] + torch.randn(40, generator=g)}
    ((_, theta),) = tswitch_compose(base, [tswitch_compress(base, tuned, density=1.0)], [1.0])
    tau = tuned["w"] - base["w"]
    torch.testing.assert_close(theta - base["w"], tau.abs().mean() * tau.sign())
    with pytest.raises(SpliceError):
        tswitch_compress(base, tuned, density=0.0)
    with pytest.raises(SpliceError):
        list(tswitch_compose(base, [{}], [1.0, 2.0]))


def test_auto_switch_weights_vote_by_nearest_neighbours():
    g = torch.Generator().manual_seed(6)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    bank = torch.cat([c + 0.5 * torch.randn(8, 2, generator=g) for c in centers])
    tasks = torch.arange(3).repeat_interleave(8)
    queries = torch.tensor([[0.2, -0.1], [9.5, 0.3], [5.0, 5.0], [0.1, 9.9]])
    w = auto_switch_weights(bank, tasks, queries, k=4)
    assert w.shape == (4, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    assert w[0, 0] == 1 and w[1, 1] == 1 and w[3, 2] == 1
    # brute-force reference for the ambiguous middle query
    d = ((bank - queries[2]) ** 2).sum(1)
    nearest = d.argsort()[:4]
    ref = torch.bincount(tasks[nearest], minlength=3).float() / 4
    torch.testing.assert_close(w[2], ref)
    with pytest.raises(SpliceError):
        auto_switch_weights(bank, tasks[:-1], queries, k=4)


def test_registered_with_validated_params():
    assert methods.get("tswitch") is TSwitch
    with pytest.raises(pydantic.ValidationError):
        TSwitch.Params(density=0.0)
    with pytest.raises(pydantic.ValidationError):
        TSwitch.ModelParams(wieght=1.0)


def test_engine_on_disk_equals_direct_per_tensor_calls(tmp_path):
    params = {"lambda": 0.8, "density": 0.3}
    base, fts, got = engine_merge(tmp_path, "tswitch", params, weights=[0.5, 1.5])
    mps = [TSwitch.ModelParams(weight=0.5), TSwitch.ModelParams(weight=1.5)]
    ref = direct_merge(TSwitch(), base, fts, TSwitch.Params(**params), mps)
    assert list(got) == list(base)
    for n in base:
        assert torch.equal(got[n], ref[n]), n
