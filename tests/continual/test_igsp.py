"""iGSP [recon] (spec peft.md §17 + errata): regulariser, pruning, phase 2, storage."""

from __future__ import annotations

import pytest
import torch

from splice.continual.igsp import IGSP, IGSPConfig


def _first_task_done(model, **cfg):
    """An iGSP with one finished task whose experts are non-zero (as if trained)."""
    method = IGSP(IGSPConfig(r=2, candidates=2, prune_below=0.0, **cfg))
    method.attach(model, ["q", "v"])
    phases = method.start_task("t0")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in phases[0].params:
            p.add_(torch.randn(p.shape, generator=g))
    phases[0].after()
    method.end_task("t0")
    return method


def _penalty(method, model, x):
    model.train()
    model(x)
    return float(method.penalty().detach())


@pytest.mark.parametrize("space", ["function", "weight"])
def test_regulariser_is_zero_inside_the_span_and_grows_with_the_orthogonal_part(tiny, space):
    method = _first_task_done(tiny, space=space)
    method.start_task("t1")
    ad = method.adapters["body.v"]
    g = torch.Generator().manual_seed(1)
    U, V = ad.U, ad.V  # historical output and input spans
    perp = torch.randn(U.shape[0], 2, generator=g)
    perp = perp - U @ (U.T @ perp)  # orthogonal to every historical output direction
    inside_B = [U @ torch.randn(U.shape[1], 2, generator=g) for _ in range(2)]
    inside_A = [(V @ torch.randn(V.shape[1], 2, generator=g)).T for _ in range(2)]
    x = torch.randn(8, 6, generator=g)
    values = []
    for t in (0.0, 1.0, 2.0):
        with torch.no_grad():
            for e, (b, a) in enumerate(zip(inside_B, inside_A, strict=True)):
                ad.B[ad.n_old + e].copy_(b + t * perp)
                ad.A[ad.n_old + e].copy_(a)
            q = method.adapters["body.q"]  # keep q's candidates at zero update
            for e in range(q.n_old, len(q.A)):
                q.B[e].zero_()
        values.append(_penalty(method, tiny, x))
    assert values[0] == pytest.approx(0.0, abs=1e-8)
    assert 0 < values[1] < values[2]
    assert values[2] == pytest.approx(4 * values[1], rel=1e-4)  # quadratic in the orthogonal part


def test_first_task_has_no_regulariser(tiny):
    method = IGSP(IGSPConfig(r=2))
    method.attach(tiny, ["q", "v"])
    method.start_task("t0")
    tiny.train()
    tiny(torch.randn(3, 6))
    assert method.penalty() is None


def test_pruning_removes_candidates_below_the_routing_threshold(tiny):
    method = _first_task_done(tiny)
    method.cfg = method.cfg.model_copy(update={"prune_below": 0.2})
    for ad in method.adapters.values():
        ad.cfg = method.cfg
    phases = method.start_task("t1")
    ad = method.adapters["body.q"]
    x = torch.rand(16, 6) + 0.5  # positive inputs
    with torch.no_grad():  # old experts' rows are zero: candidate 0 gets most mass, 1 none
        ad.router[ad.n_old].fill_(5.0)
        ad.router[ad.n_old + 1].fill_(-5.0)
    tiny.train()
    tiny(x)
    mean = ad.mass / ad.tokens
    assert float(mean[ad.n_old]) > 0.2 > float(mean[ad.n_old + 1])
    kept_router = ad.router[ad.n_old].detach().clone()
    before = method.stored().params
    phases[0].after()
    assert len(ad.A) == ad.n_old + 1  # the low-mass candidate is gone, the other stays
    assert torch.equal(ad.router[ad.n_old], kept_router)
    assert method.pruned["t1"] >= 1
    d_in, d_out, r = 6, 9, 2
    assert method.stored().params <= before - (r * (d_in + d_out) + d_in)


def test_phase_two_keeps_phase_one_experts_frozen_and_fits_orthogonally(tiny):
    method = _first_task_done(tiny)
    phases = method.start_task("t1")
    with torch.no_grad():
        for p in phases[0].params:
            p.add_(0.3)
    phases[0].after()
    frozen = {
        n: [t.detach().clone() for t in (*ad.A[: ad.n_old], *ad.B, *ad.router)]
        for n, ad in method.adapters.items()
    }
    train = phases[1].params
    assert train and all(p.requires_grad for p in train)
    opt = torch.optim.SGD(train, lr=0.5)
    tiny.train()
    tiny(torch.randn(8, 6)).square().sum().backward()
    opt.step()
    for n, ad in method.adapters.items():
        now = [*ad.A[: ad.n_old], *ad.B, *ad.router]
        assert all(torch.equal(a, b) for a, b in zip(frozen[n], now, strict=True))
        assert not any(p.requires_grad for p in [*ad.A[: ad.n_old], *ad.B, *ad.router])
        moved = [ad.expert_B()[e] - ad.B[e] for e in range(ad.n_old, len(ad.A))]
        assert any(float(m.detach().abs().max()) > 0 for m in moved)
        for m in moved:  # the residual lies outside the historical output span
            assert torch.allclose(ad.U.T @ m, torch.zeros(ad.U.shape[1], m.shape[1]), atol=1e-5)


def test_state_round_trip_and_stored_count(tiny):
    import copy

    method = _first_task_done(tiny)
    x = torch.randn(5, 6)
    tiny.eval()
    out = tiny(x)
    fresh = copy.deepcopy(tiny)
    for name, layer in list(fresh.body.named_children()):
        if hasattr(layer, "base_layer"):
            setattr(fresh.body, name, layer.base_layer)
    other = IGSP(IGSPConfig(r=2))
    other.attach(fresh, ["q", "v"])
    other.load_state(method.state(), method.tasks)
    fresh.eval()
    assert torch.allclose(fresh(x), out, atol=1e-6)
    E, r = 2, 2
    expect = sum(E * (r * (di + do) + di) for di, do in [(6, 9), (9, 5)])
    assert method.stored().params == expect == other.stored().params


def test_top_k_gates_against_the_softmax():
    from splice.continual.igsp import gates

    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    p = logits.softmax(-1)
    assert torch.allclose(gates(logits, 5), p) and torch.allclose(gates(logits, None), p)
    w = gates(logits, 2)
    assert torch.equal((w > 0).sum(-1), torch.full((7,), 2))
    top = p.topk(2, dim=-1)
    assert torch.equal(w.topk(2, dim=-1).indices, top.indices)
    ref = top.values / top.values.sum(-1, keepdim=True)  # renormalised routing probabilities
    assert torch.allclose(w.gather(-1, top.indices), ref, atol=1e-6)


def test_top_k_equal_to_the_expert_count_is_the_dense_mixture(tiny):
    import copy

    dense = _first_task_done(tiny)
    dense.start_task("t1")
    with torch.no_grad():
        for ad in dense.adapters.values():
            for e in range(ad.n_old, len(ad.A)):
                ad.B[e].add_(0.3)
                ad.router[e].add_(0.1 * (e + 1))
    topk_model = copy.deepcopy(tiny)
    x = torch.randn(6, 6)
    tiny.train()
    out = tiny(x)
    penalty = float(dense.penalty().detach())
    sparse = {n: m for n, m in topk_model.named_modules() if hasattr(m, "cfg")}
    experts = len(dense.adapters["body.q"].A)
    assert experts == 4
    for m in sparse.values():
        m.cfg = m.cfg.model_copy(update={"top_k": experts})
    topk_model.train()
    assert torch.equal(topk_model(x), out)
    sparse_penalty = sum(float(m.penalty_of().detach()) for m in sparse.values())
    assert sparse_penalty == pytest.approx(penalty, rel=1e-6)
    for m in sparse.values():  # one fewer: the output changes
        m.cfg = m.cfg.model_copy(update={"top_k": experts - 1})
    assert not torch.allclose(topk_model(x), out)


def test_top_k_gradients_reach_only_the_selected_experts(tiny):
    method = _first_task_done(tiny, top_k=2)
    method.start_task("t1")
    ad = method.adapters["body.q"]
    new, other = ad.n_old, ad.n_old + 1
    with torch.no_grad():
        for e in range(len(ad.A)):
            ad.router[e].fill_(0.0)
        ad.router[new].fill_(0.5)  # positive inputs: always among the top 2
        ad.router[other].fill_(-0.5)  # always last
        ad.B[new].add_(0.3)
        ad.B[other].add_(0.3)
    tiny.train()
    tiny(torch.rand(8, 6) + 0.5).square().sum().backward()
    for p in (ad.A[new], ad.B[new], ad.router[new]):
        assert p.grad is not None and float(p.grad.abs().max()) > 0
    for p in (ad.A[other], ad.B[other], ad.router[other]):
        assert p.grad is None or not p.grad.any()
    assert float(ad.mass[other]) == 0.0  # its routing weight, hence its pruning mass, is zero
