"""aTLAS (merging.md §5): coefficient layouts and count, CE and UFM objectives."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.merge.learned._functional import TaskVectors
from splice.merge.learned.atlas import _groups, _merge, _trusted, atlas, num_coefficients

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
    out = atlas(module, ds, data, lr=0.05, steps=150, batch_size=16, eval_every=25)
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
    got = _trusted(probs, as_coded=False)  # k = min(40 // 20, 100) = 2 per class
    assert got.sum() == 4 and got[0] and got[2]


def test_user_errors():
    module, ds, data = separable()
    unlabeled = {t: x for t, (x, _) in data.items()}
    with pytest.raises(SpliceError, match="needs labels"):
        atlas(module, ds, unlabeled, steps=1)
    with pytest.raises(SpliceError, match="partitions need blockwise"):
        atlas(module, ds, data, blockwise=False, partitions=2)
