"""aTLAS (merging.md §5): coefficient layouts and count, CE and UFM objectives."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from splice.errors import SpliceError
from splice.merge.learned._functional import TaskVectors
from splice.merge.learned.atlas import (
    _groups,
    _merge,
    _trusted,
    _TwoStreams,
    atlas,
    normalized_mean,
    num_coefficients,
    ufm_loss,
)

from ._toys import TASKS, deltas, heads, inputs, mlp, separable


def test_coefficient_count_formula_matches_every_layout():
    module, hs, x = mlp(), heads(), inputs()
    ds = deltas(module)
    labeled = {t: (x[t], torch.zeros(len(x[t]), dtype=torch.long)) for t in TASKS}
    blocks = len(list(module.parameters()))  # every tensor changed: 6 blocks
    for kw, expect in [
        ({}, 3 * blocks),
        ({"partitions": 4}, 3 * blocks * 4),
        ({"blockwise": False}, 3),
    ]:
        out = atlas(module, ds, labeled, heads=hs, steps=0, **kw)
        assert out.info["num_coefficients"] == expect == out.coefficients.numel()
    assert num_coefficients(8, 150, 1) == 1200 and num_coefficients(8, 150, 3) == 3600
    assert num_coefficients(8, 150, 1, blockwise=False) == 8


def test_zero_steps_is_the_pretrained_model():
    module, hs, x = mlp(), heads(), inputs()
    labeled = {t: (x[t], torch.zeros(len(x[t]), dtype=torch.long)) for t in TASKS}
    out = atlas(module, deltas(module), labeled, heads=hs, steps=0)
    for n, p in module.state_dict().items():
        assert torch.equal(out.weights[n], p)


def test_partitions_scale_each_entry_by_its_group_coefficient():
    module = mlp()
    tv = TaskVectors.build(module, deltas(module))
    groups = _groups(tv, 3, seed=5, device=torch.device("cpu"))
    again = _groups(tv, 3, seed=5, device=torch.device("cpu"))
    assert all(torch.equal(groups[n], again[n]) for n in tv.names)
    coef = torch.rand(3, tv.num_blocks, 3, dtype=torch.float64)
    merged = _merge(tv, coef, groups)
    for b, n in enumerate(tv.names):
        ref = tv.base[n].clone()
        for i in range(3):
            ref += coef[i, b][groups[n]] * tv.stacked[n][i]
        torch.testing.assert_close(merged[n], ref)


def test_supervised_objective_drops_and_the_selected_model_fits_all_tasks():
    module, ds, data = separable()
    out = atlas(module, ds, data, lr=0.05, steps=150, batch_size=16)
    assert sum(out.history[-10:]) / 10 < 0.5 * out.history[0]
    assert out.info["selected_accuracy"] > 0.9
    assert bool((out.coefficients.diagonal() > 0).all())  # own task vector per block scaled up


def test_unsupervised_fixmatch_objective_drops_and_trusts_top_k_per_class():
    module, ds, data = separable()
    unlabeled = {t: x for t, (x, _) in data.items()}
    # start away from 0 so the initial model has non-trivial pseudo-labels: add a small base
    with torch.no_grad():
        module.weight.copy_(0.3 * sum(d["weight"] for d in ds.values()))
    out = atlas(module, ds, unlabeled, objective="ufm", threshold=0.6, lr=0.05, steps=60)
    assert sum(out.history[-10:]) / 10 < out.history[0]
    assert out.info["trusted"] == {t: 3 for t in TASKS}  # min(48 // (3·10), 100) = 1 per class
    coded = atlas(module, ds, unlabeled, objective="ufm", as_coded=True, steps=1)
    assert coded.info["trusted"] == {t: 48 for t in TASKS}


def test_trusted_picks_the_most_confident_examples_of_each_class():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]]).repeat(10, 1)
    probs[0] = torch.tensor([0.99, 0.01])
    probs[2] = torch.tensor([0.01, 0.99])
    got = _trusted(probs)  # k = min(40 // 20, 100) = 2 per class
    assert got.sum() == 4 and got[0] and got[2]


def test_user_errors():
    module, ds, data = separable()
    unlabeled = {t: x for t, (x, _) in data.items()}
    with pytest.raises(SpliceError, match="needs labels"):
        atlas(module, ds, unlabeled, steps=1)
    with pytest.raises(SpliceError, match="partitions need blockwise"):
        atlas(module, ds, data, blockwise=False, partitions=2)


def test_selection_score_is_the_normalized_mean_not_the_raw_mean():
    expert = {"a": 1.0, "b": 0.5}
    first, second = {"a": 0.9, "b": 0.3}, {"a": 0.6, "b": 0.5}  # raw means 0.60 > 0.55
    assert normalized_mean(first, expert) == pytest.approx((0.9 + 0.6) / 2)  # 0.3 / 0.5
    assert normalized_mean(second, expert) == pytest.approx((0.6 + 1.0) / 2)
    assert normalized_mean(second, expert) > normalized_mean(first, expert)


def test_selection_runs_once_per_epoch_on_the_normalized_mean():
    module, ds, data = separable()
    data["c"] = (data["c"][0][:20], data["c"][1][:20])  # the smallest task: ⌈20 / 8⌉ = 3 steps
    hs = {t: torch.nn.Identity() for t in TASKS}
    out = atlas(module, ds, data, heads=hs, lr=0.05, steps=10, batch_size=8)
    evals = out.info["evaluations"]
    assert [e["step"] for e in evals] == [0, 3, 6, 9, 10]  # every epoch, and the last step
    for t in TASKS:  # each fine-tuned model on its own examples
        x, y = data[t]
        own = float(((x @ ds[t]["weight"].T).argmax(-1) == y).float().mean())
        assert out.info["expert_accuracy"][t] == own
    for e in evals:
        assert e["normalized"] == pytest.approx(
            normalized_mean(e["accuracy"], out.info["expert_accuracy"])
        )
    best = max(evals, key=lambda e: e["normalized"])  # first of equals, as `>` keeps it
    assert out.info["selected_step"] == best["step"]
    merged = sum(out.coefficients[i, 0] * ds[t]["weight"] for i, t in enumerate(TASKS))
    torch.testing.assert_close(out.weights["weight"], merged)
    for t in TASKS:  # the kept coefficients give the recorded accuracy
        x, y = data[t]
        acc = float(((x @ out.weights["weight"].T).argmax(-1) == y).float().mean())
        assert acc == best["accuracy"][t]


def _released_update(module, ds, data, steps: int, lr: float) -> torch.Tensor:
    """The released loop on full batches: loss × 2¹⁶ (GradScaler), clip at 1 before unscaling,
    unscale, AdamW (wd 0.1)."""
    coef = torch.zeros(3, 1, requires_grad=True)
    opt = torch.optim.AdamW([coef], lr=lr, weight_decay=0.1)
    scale = 2.0**16
    for _ in range(steps):
        w = sum(coef[i, 0] * ds[t]["weight"] for i, t in enumerate(TASKS))
        loss = sum(F.cross_entropy(x @ w.T, y) for x, y in data.values())
        opt.zero_grad()
        (loss * scale).backward()
        torch.nn.utils.clip_grad_norm_([coef], 1.0)
        coef.grad /= scale  # what scaler.step does before the optimizer step
        opt.step()
    return coef.detach()


def test_scaled_clipping_reproduces_the_released_update():
    module, ds, data = separable()
    ref = _released_update(module, ds, data, steps=30, lr=0.05)
    kw = {"lr": 0.05, "steps": 30, "batch_size": 48, "eval_every": 0}  # full batches, no selection
    got = atlas(module, ds, data, **kw).coefficients
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    true = atlas(module, ds, data, clip="unscaled", **kw).coefficients
    assert (true - ref).abs().max() > 0.05  # clipping the true gradient is another trajectory


def test_ufm_loss_uses_soft_targets_for_untrusted_examples():
    strong = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 1.0, 0.0]])
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.5]])
    target = torch.tensor([0, 0, 2])
    trusted = torch.tensor([False, False, True])
    logp = strong.log_softmax(-1)
    q = weak.softmax(-1)
    # row 0: max q = 0.965 > 0.6 → weight 1, soft target q[0]; row 1: max q = 0.55 → weight 0;
    # row 2: trusted → one-hot of its initial label (class 2), weight 1
    ref = (-(q[0] * logp[0]).sum() - logp[2, 2]) / 2
    torch.testing.assert_close(ufm_loss(strong, weak, target, trusted, 0.6), ref)
    hard = (-logp[0, 0] - logp[2, 2]) / 2  # what one-hot pseudo-labels would give
    assert float(ref - hard) > 0.03


def test_ufm_batches_take_a_quarter_from_the_trusted_set():
    from splice.merge.learned._data import Samples

    trusted = torch.zeros(40, dtype=torch.bool)
    trusted[::5] = True  # 8 trusted, 32 others
    feed = _TwoStreams(Samples(torch.arange(40.0)), trusted, 16, (0, 0))
    seen = []
    for _ in range(8):  # 8 batches × 12 others = 3 passes over the 32 others
        batch, _, idx = feed.next(torch.device("cpu"))
        assert torch.equal(batch, torch.as_tensor(idx, dtype=batch.dtype))
        assert int(trusted[idx].sum()) == 4 and len(idx) == 16
        seen.extend(i for i in idx.tolist() if not trusted[i])
    assert sorted(seen[:32]) == [i for i in range(40) if not trusted[i]]  # one full pass first
    only = _TwoStreams(Samples(torch.arange(10.0)), torch.zeros(10, dtype=torch.bool), 4, (0,))
    assert len(only.next(torch.device("cpu"))[2]) == 4  # no trusted set: all from the others
