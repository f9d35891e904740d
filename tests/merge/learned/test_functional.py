"""The functional-call machinery shared by AdaMerging, aTLAS and Concrete."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.deltas import LowRank
from splice.errors import SpliceError
from splice.merge.learned._data import Samples, as_samples, streams
from splice.merge.learned._functional import (
    Network,
    TaskVectors,
    accumulate_grad,
    entropy,
    frozen,
)
from splice.merge.learned.adamerging import entropy_objective

from ._toys import TASKS, deltas, heads, inputs, merged_copy, mlp


def test_layerwise_coefficients_at_lambda_reproduce_task_arithmetic_exactly():
    # dyadic values: every product and sum is exact in float32, so equality is bitwise
    module = mlp(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ds = {
        t: {
            n: torch.randint(-8, 8, p.shape, generator=g).float() / 8
            for n, p in module.named_parameters()
        }
        for t in TASKS
    }
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-8, 8, p.shape, generator=g).float() / 4)
    tv = TaskVectors.build(module, ds)
    lam = 0.25
    merged = tv.merge(torch.full((tv.num_blocks, tv.num_tasks), lam))
    state = module.state_dict()
    for n in state:
        ta = state[n] + lam * (ds["a"][n] + ds["b"][n] + ds["c"][n])
        assert torch.equal(merged[n], ta), n
    assert torch.equal(tv.merge(torch.full((3,), lam))["0.weight"], merged["0.weight"])


def test_network_output_equals_a_module_with_the_merged_weights_loaded():
    module, hs, x = mlp(), heads(), inputs()
    tv = TaskVectors.build(module, deltas(module))
    coef = torch.rand(tv.num_blocks, tv.num_tasks, dtype=torch.float64)
    weights = tv.merge(coef)
    net = Network(module, heads=hs, tasks=TASKS)
    ref = hs["b"](merged_copy(module, weights)(x["b"]))
    torch.testing.assert_close(net.logits(weights, "b", x["b"]), ref, rtol=0, atol=1e-12)
    before = {n: p.clone() for n, p in module.state_dict().items()}
    assert all(torch.equal(before[n], p) for n, p in module.state_dict().items())


@torch.no_grad()
def _objective_reference(module, ds, hs, x, coef):
    """Σ_t entropy of the merged model, computed with state-dict loading (no functional_call)."""
    base = module.state_dict()
    names = list(base)
    weights = {
        n: base[n] + sum(coef[b, i] * ds[t][n] for i, t in enumerate(TASKS))
        for b, n in enumerate(names)
    }
    m = merged_copy(module, weights)
    return sum(float(entropy(hs[t](m(x[t])))) for t in TASKS)


def test_adamerging_gradient_wrt_coefficients_equals_finite_difference():
    module, hs, x = mlp(), heads(), inputs()
    ds = deltas(module)
    tv = TaskVectors.build(module, ds)
    net = Network(module, heads=hs, tasks=TASKS)
    coef = (
        0.2 + 0.6 * torch.rand(tv.num_blocks, tv.num_tasks, dtype=torch.float64)
    ).requires_grad_()
    feeds = streams(x, TASKS, batch_size=len(x["a"]), seed=0)  # one batch = all examples
    with net.frozen():
        value = entropy_objective(tv.merge(coef.clamp(0, 1)), net, feeds, 1, torch.device("cpu"))
    assert value == pytest.approx(_objective_reference(module, ds, hs, x, coef.detach()), rel=1e-10)
    eps = 1e-6
    fd = torch.zeros_like(coef)
    for b in range(tv.num_blocks):
        for i in range(tv.num_tasks):
            up, down = coef.detach().clone(), coef.detach().clone()
            up[b, i] += eps
            down[b, i] -= eps
            fd[b, i] = (
                _objective_reference(module, ds, hs, x, up)
                - _objective_reference(module, ds, hs, x, down)
            ) / (2 * eps)
    torch.testing.assert_close(coef.grad, fd, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in module.parameters())
    assert all(p.grad is None for h in hs.values() for p in h.parameters())


def test_accumulate_grad_sums_losses_like_one_backward():
    w0 = torch.randn(3, 3, dtype=torch.float64)
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    weights = {"w": c * w0}
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    total = accumulate_grad(weights, [lambda w, x=x: (x @ w["w"]).pow(2).sum() for x in xs])
    grad = c.grad.clone()
    c.grad = None
    ref = sum((x @ (c * w0)).pow(2).sum() for x in xs)
    ref.backward()
    assert total == pytest.approx(float(ref.detach()))
    torch.testing.assert_close(grad, c.grad)


def test_lowrank_deltas_are_materialized_once():
    module = nn.Linear(6, 4, bias=False)
    lr = LowRank(torch.randn(4, 2), torch.randn(2, 6), scale=0.5)
    tv = TaskVectors.build(module, {"a": {"weight": lr}, "b": {}})
    torch.testing.assert_close(tv.stacked["weight"][0], lr.materialize())
    assert torch.equal(tv.stacked["weight"][1], torch.zeros(4, 6))


def test_frozen_restores_requires_grad_flags():
    m = nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with frozen(m, "not a module"):
        assert not any(p.requires_grad for p in m.parameters())
    assert m.weight.requires_grad and not m.bias.requires_grad


def test_default_forward_unpacks_mapping_batches():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale):
            return self.lin(x) * scale

    m = Kw()
    net = Network(m)
    x = torch.randn(4, 3)
    w = {"lin.weight": torch.zeros(2, 3)}
    torch.testing.assert_close(
        net.logits(w, "any", {"x": x, "scale": 2.0}), 2 * m.lin.bias.expand(4, 2)
    )


@pytest.mark.parametrize(
    ("ds", "match"),
    [
        ({"a": {"nope.weight": torch.zeros(1)}}, "not a tensor of the base module"),
        ({"a": {"0.weight": torch.zeros(3, 3)}}, "differs from the base"),
        ({}, "no task deltas"),
    ],
)
def test_bad_deltas_are_refused_with_the_tensor_name(ds, match):
    with pytest.raises(SpliceError, match=match):
        TaskVectors.build(mlp(), ds)


def test_missing_heads_and_data_are_refused():
    with pytest.raises(SpliceError, match="no head"):
        Network(mlp(), heads={"a": nn.Identity()}, tasks=TASKS)
    with pytest.raises(SpliceError, match="no data"):
        streams({"a": torch.zeros(2, 5)}, TASKS, 4, 0)
    with pytest.raises(SpliceError, match="not supported"):
        as_samples(["text"], "a")
    with pytest.raises(SpliceError, match="labels for"):
        as_samples((torch.zeros(3, 2), [0, 1]), "a")


def test_streams_are_seeded_and_cover_every_example_per_pass():
    x = Samples(torch.arange(10).float()[:, None])
    a = streams({"a": x}, ["a"], 4, seed=3)["a"]
    b = streams({"a": x}, ["a"], 4, seed=3)["a"]
    seen = []
    for _ in range(5):  # 20 draws = two passes
        ba, _, ia = a.next(torch.device("cpu"))
        bb, _, _ = b.next(torch.device("cpu"))
        assert torch.equal(ba, bb)
        seen += ia.tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


def test_a_mapping_head_swaps_task_tensors_into_the_module():
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    other = {"2.weight": torch.randn(5, 4), "2.bias": torch.randn(5)}  # 5 classes for task b
    net = Network(module, heads={"a": {}, "b": other}, tasks=["a", "b"])
    x = torch.randn(6, 3)
    w = {"0.weight": torch.randn(4, 3)}
    assert net.logits(w, "a", x).shape == (6, 2)
    ref = torch.tanh(x @ w["0.weight"].T + module[0].bias) @ other["2.weight"].T + other["2.bias"]
    torch.testing.assert_close(net.logits(w, "b", x), ref)
