"""AdaMerging (merging.md §14): the loop, the layouts, AdaMerging++'s TIES processing."""

from __future__ import annotations

import pytest
import torch

from splice.merge.learned import learned
from splice.merge.learned._functional import TaskVectors
from splice.merge.learned.adamerging import adamerging, ties_process

from ._toys import TASKS, deltas, heads, inputs, mlp


def test_layerwise_loop_reduces_entropy_and_returns_consistent_weights():
    module, hs, x = mlp(), heads(), inputs()
    ds = deltas(module)
    out = adamerging(module, ds, x, heads=hs, steps=40, lr=0.05, batch_size=8)
    first, last = out.history[0], sum(out.history[-5:]) / 5
    assert last < 0.9 * first
    c = out.coefficients
    assert c.shape == (6, 3) and bool(((c >= 0) & (c <= 1)).all())
    assert not torch.allclose(c, torch.full_like(c, 0.3))
    base = module.state_dict()
    for b, n in enumerate(out.info["names"]):
        ref = base[n] + sum(c[b, i] * ds[t][n] for i, t in enumerate(TASKS))
        torch.testing.assert_close(out.weights[n], ref)


def test_zero_steps_is_task_arithmetic_at_init():
    module = mlp()
    ds = deltas(module)
    out = adamerging(module, ds, inputs(), heads=heads(), steps=0, mode="task")
    assert out.coefficients.shape == (3,)
    base = module.state_dict()
    for n in base:
        torch.testing.assert_close(out.weights[n], base[n] + 0.3 * sum(ds[t][n] for t in TASKS))


def test_taskwise_coefficients_move_and_objective_drops():
    module, hs, x = mlp(), heads(), inputs()
    out = adamerging(module, deltas(module), x, heads=hs, mode="task", steps=30, lr=0.05)
    assert sum(out.history[-5:]) / 5 < out.history[0]
    assert out.info["num_coefficients"] == 3


def _ties_reference(vectors: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim + elect + keep-agreeing on a (T, P) matrix, by sorting (official semantics)."""
    t, p = vectors.shape
    k = int(density * p)
    out = torch.zeros_like(vectors)
    for i in range(t):
        idx = vectors[i].abs().argsort(descending=True)[:k]
        out[i, idx] = vectors[i, idx]
    sign = out.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    return out * (out.sign() == sign)


def test_ties_process_matches_a_sorting_reference_over_the_whole_model():
    module = mlp()
    tv = TaskVectors.build(module, deltas(module))
    flat = torch.cat([tv.stacked[n].reshape(3, -1) for n in tv.names], dim=1)
    out = ties_process(tv, 0.2)
    got = torch.cat([out.stacked[n].reshape(3, -1) for n in tv.names], dim=1)
    torch.testing.assert_close(got, _ties_reference(flat, 0.2), rtol=0, atol=0)
    # per task the trim is global: some tensors keep more than 20 %, some less
    kept = [float((out.stacked[n][0] != 0).float().mean()) for n in tv.names]
    assert max(kept) > 0.2 > min(kept)
    assert torch.equal(
        tv.stacked[tv.names[0]], TaskVectors.build(module, deltas(module)).stacked[tv.names[0]]
    )


def test_adamerging_plus_plus_merges_ties_processed_vectors():
    module, hs, x = mlp(), heads(), inputs()
    ds = deltas(module)
    out = adamerging(module, ds, x, heads=hs, steps=0, ties_density=0.2)
    tv = ties_process(TaskVectors.build(module, ds), 0.2)
    base = module.state_dict()
    for n in tv.names:
        torch.testing.assert_close(out.weights[n], base[n] + 0.3 * tv.stacked[n].sum(0))


def test_registered_run_validates_and_forwards_context():
    module, hs, x = mlp(), heads(), inputs()
    m = learned.get("adamerging")
    out = m.run(module, deltas(module), x, params={"steps": 2, "mode": "task"}, heads=hs, rows=None)
    assert len(out.history) == 2


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 4)
    ).double()
    net[1].running_mean.fill_(2.0)  # stale statistics, far from any batch's
    net[1].running_var.fill_(9.0)
    return net.eval()


def _reference_entropy(module, ds, hs, x, train_bn: bool) -> float:
    """Σ_t H(batch of task t) of the merge at λ = 0.3, by an ordinary copy of the module."""
    from splice.merge.learned._data import streams
    from splice.merge.learned._functional import entropy

    from ._toys import merged_copy

    weights = {n: p + 0.3 * sum(ds[t][n] for t in TASKS) for n, p in module.named_parameters()}
    ref = merged_copy(module, weights).train(train_bn)
    feeds = streams(x, TASKS, 8, 0)
    with torch.no_grad():
        return sum(float(entropy(hs[t](ref(feeds[t].next(None)[0])))) for t in TASKS)


def test_batch_statistics_fit_uses_each_batchs_moments_and_keeps_the_buffers():
    module, hs, x = _bn_net(), heads(), inputs()
    ds = deltas(module)
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    kw = dict(heads=hs, steps=1, batch_size=8, batches_per_step=1, mode="task")
    batch = adamerging(module, ds, x, bn="batch", **kw)
    running = adamerging(module, ds, x, **kw)
    assert batch.history[0] == pytest.approx(_reference_entropy(module, ds, hs, x, True))
    assert running.history[0] == pytest.approx(_reference_entropy(module, ds, hs, x, False))
    assert abs(batch.history[0] - running.history[0]) > 1e-3
    assert batch.info["bn"] == "batch"
    assert not module.training and module[1].track_running_stats  # restored
    for n, b in module.named_buffers():
        torch.testing.assert_close(b, buffers[n])  # neither read nor updated
