"""Task Arithmetic (merging.md §1) against θ₀ + λ Σ w_t (θ_t − θ₀) in float64."""

from __future__ import annotations

import pytest
import torch

from splice.merge import merge_state_dicts
from tests.merge._ckpt import finetune, tiny_llama


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return base, [finetune(base, s) for s in range(3)]


def test_matches_the_formula(models):
    base, fts = models
    weights = [1.0, 0.5, -0.25]  # a negative weight is task negation
    got = merge_state_dicts(
        "task_arithmetic",
        fts,
        base=base,
        params={"lambda": 0.3},
        model_params=[{"weight": w} for w in weights],
    )
    for n, b in base.items():
        if b.is_floating_point():
            tv = sum(w * (m[n].double() - b.double()) for w, m in zip(weights, fts, strict=True))
            torch.testing.assert_close(got[n], (b.double() + 0.3 * tv).float(), atol=1e-6, rtol=0)
        else:
            assert torch.equal(got[n], b)


def test_lambda_zero_returns_the_base(models):
    base, fts = models
    got = merge_state_dicts("task_arithmetic", fts, base=base, params={"lambda": 0.0})
    assert all(torch.equal(got[n], base[n]) for n in base)


def test_normalize_divides_by_the_weights(models):
    base, fts = models
    got = merge_state_dicts("task_arithmetic", [fts[0]] * 3, base=base, params={"normalize": True})
    for n, t in fts[0].items():
        torch.testing.assert_close(got[n], t, atol=1e-6, rtol=0)


def test_lambda_gradient_follows_depth(models):
    base, fts = models
    got = merge_state_dicts(
        "task_arithmetic", fts[:1], base=base, params={"lambda": {"gradient": [0.0, 1.0]}}
    )
    # 3 layers: depth 0, 0.5, 1; tensors outside the stack sit at depth 0
    for i, lam in enumerate([0.0, 0.5, 1.0]):
        n = f"model.layers.{i}.mlp.up_proj.weight"
        ref = base[n] + lam * (fts[0][n] - base[n])
        torch.testing.assert_close(got[n], ref, atol=1e-6, rtol=0)
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
