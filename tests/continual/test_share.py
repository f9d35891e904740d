"""Share (spec peft.md §7): bases, merge, the paper/code switch, storage, sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.continual.share import (
    Share,
    ShareConfig,
    init_subspace,
    merge_subspace,
    principal_basis,
)
from splice.deltas import LowRank
from splice.errors import SpliceError


def _projector(c: torch.Tensor) -> torch.Tensor:
    return c.double() @ c.double().T


def test_basis_is_orthonormal_and_spans_the_centred_top_components():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(20, 12, generator=g) + 3.0  # a large shared mean: centring matters
    c = principal_basis(stack, k=4)
    assert torch.allclose(c.T @ c, torch.eye(4), atol=1e-5)
    # independent reference: eigenvectors of the d×d covariance of the centred columns (the
    # released code's route), top 4 by eigenvalue
    x = stack.double().numpy()
    x = x - x.mean(axis=1, keepdims=True)
    w, v = np.linalg.eigh(x @ x.T)
    ref = torch.from_numpy(v[:, np.argsort(w)[::-1][:4]].copy())
    assert torch.allclose(_projector(c), ref @ ref.T, atol=1e-5)


def test_k_by_explained_variance():
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(30, 10, generator=g) * torch.linspace(5, 0.1, 10)
    s = np.linalg.svd(stack.double().numpy() - stack.double().numpy().mean(1, keepdims=True),
                      compute_uv=False)  # fmt: skip
    share = np.cumsum(s**2) / np.sum(s**2)
    for v in (0.3, 0.6, 0.9):
        expect = int(np.argmax(share >= v)) + 1
        assert principal_basis(stack, None, v).shape[1] == expect


def _in_span_tasks(n_tasks: int, r: int = 3, dim: int = 4):
    """Factors of ``n_tasks`` tasks whose columns all lie in one ``dim``-dim subspace."""
    g = torch.Generator().manual_seed(2)
    qa, _ = torch.linalg.qr(torch.randn(11, dim, generator=g))
    qb, _ = torch.linalg.qr(torch.randn(7, dim, generator=g))
    return [(qa @ torch.randn(dim, r, generator=g), qb @ torch.randn(dim, r, generator=g))
            for _ in range(n_tasks)]  # fmt: skip


@pytest.mark.parametrize("fidelity", ["paper", "code"])
def test_reprojection_of_in_span_tasks_reproduces_their_delta_exactly(fidelity):
    tasks = _in_span_tasks(4)
    c_a, c_b, ls = init_subspace(tasks[:3], k=4)
    loadings = {f"t{i}": pair for i, pair in enumerate(ls)}
    dw = {t: (c_b @ lb) @ (c_a @ la).T for t, (la, lb) in loadings.items()}
    # the new task t3 trains loadings in the old bases plus a temporary path, all in the span
    (a3, b3) = tasks[3]
    loadings["t3"] = (c_a.T @ a3 * 0.5, c_b.T @ b3 * 0.5)
    extra = (a3 * 0.5, b3 * 0.5)  # full factors: (0.5 + 0.5)·(a3, b3)
    na, nb, new = merge_subspace(c_a, c_b, loadings, "t3", extra, k=4, fidelity=fidelity)
    assert torch.allclose(na.T @ na, torch.eye(4), atol=1e-5)
    for t in ("t0", "t1", "t2"):
        la, lb = new[t]
        assert torch.allclose((nb @ lb) @ (na @ la).T, dw[t], atol=1e-4)
    la, lb = new["t3"]
    # paper: the full reconstruction; code: without the temporary path (half of each factor)
    expect = b3 @ a3.T if fidelity == "paper" else 0.25 * b3 @ a3.T
    assert torch.allclose((nb @ lb) @ (na @ la).T, expect, atol=1e-4)


def test_code_and_paper_differ_only_in_the_new_tasks_loadings():
    g = torch.Generator().manual_seed(3)
    c_a, c_b, ls = init_subspace([(torch.randn(11, 3, generator=g), torch.randn(7, 3, generator=g))
                                  for _ in range(2)], k=4)  # fmt: skip
    loadings = {"t0": ls[0], "t1": ls[1]}
    loadings["new"] = (torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g))
    extra = (torch.randn(11, 3, generator=g), torch.randn(7, 3, generator=g))
    pa, pb, paper = merge_subspace(c_a, c_b, loadings, "new", extra, k=5, fidelity="paper")
    ca, cb, code = merge_subspace(c_a, c_b, loadings, "new", extra, k=5, fidelity="code")
    assert torch.equal(pa, ca) and torch.equal(pb, cb)  # the temporary path enters both bases
    for t in ("t0", "t1"):
        assert all(torch.equal(x, y) for x, y in zip(paper[t], code[t], strict=True))
    la, _lb = loadings["new"]
    assert torch.allclose(code["new"][0], ca.T @ (c_a @ la), atol=1e-6)
    assert torch.allclose(paper["new"][0], pa.T @ (c_a @ la + extra[0]), atol=1e-6)
    assert not torch.allclose(code["new"][0], paper["new"][0], atol=1e-3)


def _train_like(params, seed):
    """Stand-in for training: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_share_sequence_stores_basis_plus_loadings_and_serves_each_task(tiny):
    k, r, T = 3, 4, 3
    share = Share(ShareConfig(r=r, k=k, rank_updates=2))
    share.attach(tiny, ["q", "v"])
    x = torch.randn(4, 6)
    outputs = {}
    for i in range(T):
        (phase,) = share.start_task(f"t{i}")
        _train_like(phase.params, i)
        share.end_task(f"t{i}")
        for ad in share.adapters.values():
            assert torch.allclose(ad.C_A.T @ ad.C_A, torch.eye(k), atol=1e-5)
        outputs = {t: (share.use_task(t), tiny(x))[1] for t in share.tasks}
    sizes = [(6, 9), (9, 5)]  # (d_in, d_out) of q and v
    expect = sum(k * (di + do) for di, do in sizes) + T * len(sizes) * 2 * k * r
    stored = share.stored()
    assert stored.params == expect and stored.bytes == 4 * expect
    assert len({round(float(o.sum()), 5) for o in outputs.values()}) == T  # per-task ΔW
    # state round trip: a fresh model serves every task identically
    import copy

    fresh = copy.deepcopy(tiny)
    other = Share(ShareConfig(r=r, k=k))
    for name, layer in list(fresh.body.named_children()):
        if hasattr(layer, "base_layer"):
            setattr(fresh.body, name, layer.base_layer)
    other.attach(fresh, ["q", "v"])
    other.load_state(share.state(), share.tasks)
    for t in share.tasks:
        other.use_task(t)
        assert torch.allclose(fresh(x), outputs[t], atol=1e-6)


def test_a_new_task_starts_from_the_previous_tasks_delta(tiny):
    share = Share(ShareConfig(r=2, k=3))
    share.attach(tiny, ["q", "v"])
    (phase,) = share.start_task("a")
    _train_like(phase.params, 0)
    share.end_task("a")
    before = {n: ad.delta().materialize() for n, ad in share.adapters.items()}
    share.start_task("b")  # loadings copied, R₂ = 0: ΔW unchanged until training moves it
    for n, ad in share.adapters.items():
        assert torch.allclose(ad.delta().materialize(), before[n], atol=1e-6)


def _lora(rank, d_in=6, d_out=9):
    return LowRank(torch.randn(d_out, rank), torch.randn(rank, d_in), 2.0)


def test_seed_from_existing_loras_and_refuse_mixed_ranks_or_targets(tiny):
    share = Share(ShareConfig(r=2, k=3))
    share.attach(tiny, ["q", "v"])
    good = {f"s{i}": {"body.q.weight": _lora(2), "body.v.weight": _lora(2, 9, 5)} for i in range(2)}
    share.seed(good)
    (phase,) = share.start_task("t0")
    assert phase.name == "loadings"  # seeded: the first task already trains loadings
    ranks = {"a": good["s0"], "b": {"body.q.weight": _lora(3), "body.v.weight": _lora(2, 9, 5)}}
    with pytest.raises(SpliceError, match="different ranks"):
        Share(ShareConfig(r=2)).seed(ranks)
    targets = {"a": good["s0"], "b": {"body.q.weight": _lora(2)}}
    with pytest.raises(SpliceError, match="different target sets"):
        Share(ShareConfig(r=2)).seed(targets)


def test_refit_trains_the_tasks_loadings_in_the_merged_bases(tiny):
    """§7 step 3's optional fine-tuning: the merge runs after the first phase, the refit
    phase trains only the task's loadings in the new bases, and what is stored is the same
    size as without it."""
    k, r = 3, 2
    plain, refit = Share(ShareConfig(r=r, k=k)), Share(ShareConfig(r=r, k=k, refit=0.25))
    x = torch.randn(4, 6)
    for share, model in ((plain, tiny), (refit, __import__("copy").deepcopy(tiny))):
        share.attach(model, ["q", "v"])
        for i, task in enumerate(("a", "b")):
            phases = share.start_task(task)
            _train_like(phases[0].params, i)
            if share is plain:
                assert len(phases) == 1
                share.end_task(task)
                continue
            assert [p.fraction for p in phases] == [0.75, 0.25] and phases[1].params == []
            phases[0].after()  # the merge: bases re-extracted, the task's loadings re-projected
            ad = share.adapters["body.q"]
            merged = {t: tuple(x.clone() for x in ad.loadings[t]) for t in ad.loadings}
            assert set(merged) == set(share.tasks) | {task}
            assert len(phases[1].params) == 2 * len(share.adapters)  # L_A, L_B per site
            assert all(p.shape == (ad.C_A.shape[1], r) for p in phases[1].params[:2])
            y0 = model(x)
            share.use_task(task)
            assert torch.allclose(model(x), y0, atol=1e-6)  # refit starts at the merged task
            _train_like(phases[1].params, 10 + i)
            share.end_task(task)
            la, _ = ad.loadings[task]
            assert torch.equal(la, phases[1].params[0].detach())  # the refit loadings are kept
            for t in share.tasks[:-1]:  # earlier tasks untouched by the refit
                assert all(
                    torch.equal(u, v) for u, v in zip(ad.loadings[t], merged[t], strict=True)
                )
    assert refit.stored().params == plain.stored().params


def test_k_defaults_to_r_and_the_variance_rule_is_opt_in(tiny):
    assert ShareConfig(r=4).components() == (4, 1.0)
    assert ShareConfig(r=4, variance=0.6).components() == (None, 0.6)
    assert ShareConfig(r=4, k=3, variance=0.6).components() == (3, 1.0)  # a fixed k wins
    share = Share(ShareConfig(r=4))
    share.attach(tiny, ["q", "v"])
    (phase,) = share.start_task("a")
    _train_like(phase.params, 0)
    share.end_task("a")
    assert {ad.C_A.shape[1] for ad in share.adapters.values()} == {4}
