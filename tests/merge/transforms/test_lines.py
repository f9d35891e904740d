"""LiNeS (spec merging.md §6): depth schedule, automatic α, flat schedule = inner method."""

from __future__ import annotations

import pydantic
import pytest
import torch

from splice.merge.base import MergeContext, transforms
from splice.merge.engine import layer_indices
from splice.merge.transforms.lines import LiNeS, LinesAlpha, lines_scale
from tests.merge._engine_run import engine_merge

NUM_LAYERS = 4


def _model(seed):
    g = torch.Generator().manual_seed(seed)
    names = {"embed.weight": None, "final_norm.weight": None}
    names |= {f"layers.{i}.mlp.weight": i for i in range(NUM_LAYERS)}
    return {n: torch.randn(5, 3, generator=g, dtype=torch.float64) for n in names}, names


def _ctx(name, layer, stats=None):
    return MergeContext(name, layer=layer, num_layers=NUM_LAYERS, stats=stats or {})


def test_schedule_is_linear_in_depth():
    """λ(ℓ) = α + β(ℓ−1)/(L−1) for blocks ℓ = 1..L; α outside the blocks."""
    alpha, beta = 0.3, 0.6
    for block in range(1, NUM_LAYERS + 1):  # the paper's 1-based ℓ
        expect = alpha + beta * (block - 1) / (NUM_LAYERS - 1)
        assert lines_scale(block - 1, NUM_LAYERS, alpha, beta) == pytest.approx(expect)
    assert lines_scale(None, NUM_LAYERS, alpha, beta) == alpha
    assert lines_scale(0, 1, alpha, beta) == pytest.approx(alpha + beta)


def _apply_all(params, base, merged, tuned, layers, stats=None):
    lines = LiNeS()
    return {
        n: lines.apply(base[n], merged[n], [t[n] for t in tuned], params, _ctx(n, layers[n], stats))
        for n in base
    }


def test_apply_matches_per_tensor_loop_reference():
    base, layers = _model(0)
    merged, _ = _model(1)
    params = LiNeS.Params(alpha=0.2, beta=0.5)
    got = _apply_all(params, base, merged, [merged], layers)
    for n, layer in layers.items():
        lam = 0.2 if layer is None else 0.2 + 0.5 * layer / (NUM_LAYERS - 1)
        ref = torch.empty_like(base[n])
        for i in range(ref.shape[0]):
            for j in range(ref.shape[1]):
                ref[i, j] = base[n][i, j] + lam * (merged[n][i, j] - base[n][i, j])
        torch.testing.assert_close(got[n], ref)


def test_flat_schedule_and_single_task_gamma_one_leave_the_merge_unchanged():
    base, layers = _model(2)
    merged, _ = _model(3)
    got = _apply_all(LiNeS.Params(alpha=1.0, beta=0.0), base, merged, [merged], layers)
    for n in base:
        torch.testing.assert_close(got[n], merged[n])
    # single-task editing: α = γ, β = 1 − γ keeps the last block's full update
    edit = _apply_all(LiNeS.Params(alpha=0.25, beta=0.75), base, merged, [merged], layers)
    last = f"layers.{NUM_LAYERS - 1}.mlp.weight"
    torch.testing.assert_close(edit[last], merged[last])
    torch.testing.assert_close(
        edit["embed.weight"],
        base["embed.weight"] + 0.25 * (merged["embed.weight"] - base["embed.weight"]),
    )


def _alpha(base, tuned, merged, layers):
    (stat,) = LiNeS().global_stats(LiNeS.Params(beta=0.5), len(tuned))
    for n in base:
        stat.observe(n, base[n], [t[n] for t in tuned], merged[n], _ctx(n, layers[n]))
    assert stat.end_pass()
    return stat.key, stat.result()


def test_automatic_alpha_is_one_over_t_for_task_arithmetic():
    base, layers = _model(4)
    tuned = [_model(5 + t)[0] for t in range(3)]
    ta = {n: base[n] + sum(t[n] - base[n] for t in tuned) for n in base}
    key, alpha = _alpha(base, tuned, ta, layers)
    assert key == LinesAlpha.key
    assert alpha == pytest.approx(1 / 3, rel=1e-12)
    got = _apply_all(LiNeS.Params(beta=0.0), base, ta, tuned, layers, {key: alpha})
    for n in base:  # β = 0: plain TA with λ = α, i.e. the task-vector mean
        torch.testing.assert_close(got[n], sum(t[n] for t in tuned) / 3)


@pytest.mark.parametrize("chunk", [None, 4])
def test_automatic_alpha_is_the_l1_norm_ratio(monkeypatch, chunk):
    if chunk is not None:  # tensors are streamed in chunks of this many elements
        monkeypatch.setattr("splice.merge.transforms.lines.CHUNK", chunk)
    base, layers = _model(8)
    tuned = [_model(9 + t)[0] for t in range(2)]
    merged = {n: base[n] + 0.4 * (tuned[0][n] - base[n]) for n in base}
    _, alpha = _alpha(base, tuned, merged, layers)
    l1_sum = sum(float((tuned[0][n] + tuned[1][n] - 2 * base[n]).abs().sum()) for n in base)
    l1_mtl = sum(float((merged[n] - base[n]).abs().sum()) for n in base)
    assert alpha == pytest.approx(l1_sum / (2 * l1_mtl), rel=1e-9)
    assert LiNeS().global_stats(LiNeS.Params(alpha=0.5, beta=0.5), 2) == []


def test_registered_as_a_transform_with_validated_params():
    assert transforms.get("lines") is LiNeS
    with pytest.raises(pydantic.ValidationError):
        LiNeS.Params(alpha=0.5)  # β is required
    with pytest.raises(pydantic.ValidationError):
        LiNeS.Params(beta=0.5, gamma=0.3)


def test_engine_lines_on_task_arithmetic(tmp_path):
    """Through the engine: automatic α = 1/T, depth from the tensor names; a flat schedule
    returns the inner method's output unchanged."""
    base, fts, got = engine_merge(tmp_path, "task_arithmetic", {}, lines={"beta": 0.6})
    layers = layer_indices(list(base))
    for n, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(got[n], b)
            continue
        layer, num = layers.get(n, (None, None))
        tau = (fts[0][n] - b) + (fts[1][n] - b)
        expect = b + lines_scale(layer, num, 0.5, 0.6) * tau
        torch.testing.assert_close(got[n], expect, rtol=1e-5, atol=1e-6)
    ta = engine_merge(tmp_path / "ta", "task_arithmetic", {})[2]
    flat = engine_merge(tmp_path / "flat", "task_arithmetic", {}, lines={"alpha": 1, "beta": 0})[2]
    assert all(torch.equal(flat[n], ta[n]) for n in ta)
