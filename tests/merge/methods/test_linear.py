"""Linear merge against Σ w θ / Σ w computed entry by entry."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge_state_dicts
from tests.merge._ckpt import finetune, tiny_llama


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return [finetune(base, s, scale=0.5) for s in range(3)]


def _reference(models, weights, normalize=True):
    out = {}
    for n, t in models[0].items():
        if not t.is_floating_point():
            continue
        flat = [m[n].double().flatten().tolist() for m in models]
        vals = []
        for j in range(len(flat[0])):
            s = sum(w * f[j] for w, f in zip(weights, flat, strict=True))
            vals.append(s / sum(weights) if normalize else s)
        out[n] = torch.tensor(vals, dtype=torch.float64).reshape(t.shape).float()
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average_matches_the_formula(models, normalize):
    weights = [0.2, 0.5, 1.3]
    got = merge_state_dicts(
        "linear",
        models,
        params={"normalize": normalize},
        model_params=[{"weight": w} for w in weights],
    )
    for n, ref in _reference(models, weights, normalize).items():
        torch.testing.assert_close(got[n], ref, atol=1e-6, rtol=0)


def test_merging_a_model_with_itself_returns_it(models):
    got = merge_state_dicts("linear", [models[0]] * 3)
    for n, t in models[0].items():
        torch.testing.assert_close(got[n], t, atol=1e-6, rtol=0)


def test_weights_summing_to_zero_are_an_error(models):
    with pytest.raises(SpliceError, match="sum to 0"):
        merge_state_dicts("linear", models[:2], model_params=[{"weight": 1}, {"weight": -1}])


def test_inputs_are_not_modified(models):
    before = {n: t.clone() for n, t in models[1].items()}
    merge_state_dicts("linear", models)
    assert all(torch.equal(models[1][n], before[n]) for n in before)
