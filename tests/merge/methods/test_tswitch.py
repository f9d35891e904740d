"""T-Switch / Auto-Switch (spec merging.md §12 and its Errata): switches, storage, composition."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from splice.deltas import Delta, Switch, load_deltas, save_deltas
from splice.errors import SpliceError
from splice.merge.base import MergeContext, methods
from splice.merge.methods.tswitch import (
    AutoSwitch,
    TSwitch,
    auto_switch_weights,
    compose,
    compress,
    switch_approx,
    switch_delta,
    tswitch_compose,
    tswitch_compress,
)
from tests.merge._engine_run import direct_merge, engine_merge


def _reference(tau, keep):
    """Element loop after the official code (Errata §12): each sign keeps the entries with
    magnitude ≥ its ⌊keep·n_±⌋-th largest non-zero magnitude (all of them when that is 0);
    κ = ‖τ_kept‖₂ / ‖sign(τ_kept)‖₂ = RMS of the kept entries."""
    flat = tau.double().flatten().tolist()
    kept = []
    for sign in (1, -1):
        mags = sorted((x * sign for x in flat if x * sign > 0), reverse=True)
        k = int(len(mags) * keep)
        threshold = mags[k - 1] if k else 0.0
        kept += [i for i, x in enumerate(flat) if x * sign > 0 and x * sign >= threshold]
    kappa = math.sqrt(sum(flat[i] ** 2 for i in kept) / len(kept)) if kept else 0.0
    out = [0.0] * len(flat)
    for i in kept:
        out[i] = kappa if flat[i] > 0 else -kappa
    return torch.tensor(out, dtype=torch.float32).reshape(tau.shape), len(kept), kappa


def _tau(shape, seed):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(shape, generator=g)
    flat = tau.view(-1)
    flat[:: max(1, flat.numel() // 5)] = 0.0  # untouched entries
    if flat.numel() > 20:
        flat[5:9] = 0.75  # ties at a threshold
        flat[9:12] = -0.5
    return tau


@pytest.mark.parametrize(
    ("shape", "keep"),
    [((13, 7), 0.1), ((50,), 0.4), ((4, 3, 5), 1.0), ((31, 17), 0.4), ((3,), 0.4), ((), 0.4)],
)
def test_switch_matches_the_official_rule_element_by_element(shape, keep):
    tau = _tau(shape, len(shape) + int(10 * keep))
    ref, count, kappa = _reference(tau, keep)
    sw = switch_delta(tau, keep)
    assert sw.count == count and sw.shape == tau.shape
    assert sw.scale.item() == pytest.approx(kappa, rel=1e-6)
    torch.testing.assert_close(sw.materialize(), ref)
    torch.testing.assert_close(switch_approx(tau, keep), ref)


def test_positive_and_negative_entries_are_trimmed_separately():
    """Nine large positives and nine small negatives: a joint magnitude trim at 40 % would keep
    positives only; per sign, ⌊0.4·9⌋ = 3 of each survive."""
    tau = torch.cat([torch.arange(10.0, 19.0), -torch.arange(1.0, 10.0) / 10])
    approx = switch_approx(tau, 0.4)
    kept = approx != 0
    assert kept[:9].sum() == 3 and kept[9:].sum() == 3
    assert kept[6:9].all() and kept[-3:].all()  # the largest of each sign
    kappa = torch.sqrt((tau[6:9].square().sum() + tau[-3:].square().sum()) / 6)
    torch.testing.assert_close(approx.abs().max(), kappa)


def test_scale_matches_the_l2_norm_of_the_kept_entries():
    """‖τ̂‖₂ = ‖τ ⊙ M‖₂ (κ is the RMS of the kept entries, not their mean |τ|)."""
    tau = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for keep in (0.05, 0.4, 1.0):
        approx = switch_approx(tau, keep).double()
        mask = approx != 0
        torch.testing.assert_close(approx.norm(), (tau * mask).norm(), rtol=1e-6, atol=0)
        assert approx.abs().max() > (tau * mask).abs().sum() / mask.sum()  # RMS > mean here
    assert TSwitch.Params().density == 0.4


def test_zero_dim_parameters_stay_exact_and_all_zero_tensors_stay_zero():
    tau = torch.tensor(-0.3125)
    assert switch_approx(tau).item() == -0.3125
    assert switch_delta(tau).materialize().item() == -0.3125
    zero = torch.zeros(7, 5)
    assert torch.equal(switch_approx(zero), zero) and switch_delta(zero).count == 0


@pytest.mark.parametrize(("density", "encoding"), [(0.5, "bitmap"), (0.01, "indices")])
def test_storage_accounting_matches_bit_counts(density, encoding):
    tau = torch.randn(64, 50, generator=torch.Generator().manual_seed(2))
    sw = switch_delta(tau, density)
    numel, count = tau.numel(), sw.count
    assert count == int(density * (tau > 0).sum()) + int(density * (tau < 0).sum())
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
    inputs = [t["w"].clone() for t in tuned]  # merge may overwrite its inputs
    merged = TSwitch().merge(base["w"], inputs, params, mps, MergeContext("w"))
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
    torch.testing.assert_close(theta - base["w"], tau.square().mean().sqrt() * tau.sign())
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


def test_auto_switch_equals_the_official_knn_averaged_per_batch():
    """The official code: ``KNeighborsClassifier(n_neighbors=10)`` fitted on 100 training
    features per task, ``predict_proba`` of a test batch averaged over its rows."""
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(7)
    features = [torch.randn(130, 6, generator=g) + 1.5 * t for t in range(4)]
    auto = AutoSwitch(features)
    assert auto.k == 10 and auto.bank.shape == (400, 6)
    knn = KNeighborsClassifier(n_neighbors=10).fit(
        torch.cat([f[:100] for f in features]).numpy(), auto.tasks.numpy()
    )
    batch = torch.randn(32, 6, generator=g) + 3.0
    want = knn.predict_proba(batch.numpy())
    torch.testing.assert_close(auto.proba(batch), torch.from_numpy(want).float())
    torch.testing.assert_close(auto.batch_weights(batch), torch.from_numpy(want.mean(0)).float())
    assert auto.batch_weights(batch).sum().item() == pytest.approx(1.0)


def test_per_task_and_auto_switch_compose_one_model_per_batch():
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(9, 4, generator=g), "ids": torch.arange(3)}
    tuned = [{"w": base["w"] + torch.randn(9, 4, generator=g), "ids": base["ids"]} for _ in "ab"]
    switches = [compress(base, t) for t in tuned]
    own = dict(compose(base, [switches[1]], [1.0]))  # per-task switching: θ₀ + τ̂_1
    torch.testing.assert_close(own["w"], base["w"] + _reference(tuned[1]["w"] - base["w"], 0.4)[0])
    auto = AutoSwitch([torch.zeros(3, 2), torch.ones(3, 2)], k=3)
    w = auto.batch_weights(torch.tensor([[0.0, 0.1], [0.9, 1.0], [1.0, 1.1], [1.2, 0.9]]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))
    mixed = dict(compose(base, switches, w.tolist()))
    expect = base["w"] + 0.25 * switches[0]["w"].materialize() + 0.75 * own["w"] - 0.75 * base["w"]
    torch.testing.assert_close(mixed["w"], expect)
    with pytest.raises(SpliceError, match="feature matrix"):
        AutoSwitch([torch.zeros(0, 2)])


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
