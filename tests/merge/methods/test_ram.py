"""RAM / RAM+ against mergekit 0.1.5's formula written out entry by entry."""

from __future__ import annotations

import torch

from splice.merge import merge_state_dicts


def ram_ref(base, fts, eps, plus=False, r=0.1, alpha=0.2):
    taus = [(f - base).flatten().tolist() for f in fts]
    n = len(taus[0])
    active = [[abs(t[j]) > eps for j in range(n)] for t in taus]
    count = [sum(a[j] for a in active) for j in range(n)]
    lam = [1.0] * len(fts)
    if plus:
        for i, a in enumerate(active):
            shared = sum(1 for j in range(n) if a[j] and count[j] > 1)
            unique = sum(1 for j in range(n) if a[j] and count[j] == 1)
            lam[i] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    merged = []
    for j in range(n):
        vals = [t[j] for t, a in zip(taus, active, strict=True) if a[j]]
        if count[j] == 1:
            i = next(i for i, a in enumerate(active) if a[j])
            merged.append(vals[0] * lam[i])
        else:
            merged.append(sum(vals) / max(count[j], 1))
    return base + torch.tensor(merged).reshape(base.shape)


def _inputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    fts = []
    for i in range(3):
        tau = torch.randn(40, 30, generator=g) * 0.1
        tau[torch.rand(40, 30, generator=g) < 0.3 + 0.2 * i] = 0  # inactive entries
        fts.append(base + tau)
    return base, fts


def test_ram_and_ram_plus_match_the_formula():
    base, fts = _inputs()
    for params in ({"epsilon": 1e-5}, {"plus": True, "epsilon": 0.05, "alpha": 0.5, "r": 0.3}):
        got = merge_state_dicts("ram", [{"w": f} for f in fts], base={"w": base}, params=params)[
            "w"
        ]
        ref = ram_ref(
            base,
            fts,
            params["epsilon"],
            params.get("plus", False),
            params.get("r", 0.1),
            params.get("alpha", 0.2),
        )
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_disjoint_task_vectors_are_summed_whole():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 2.0, 0, 0, 0, 0])
    b = torch.tensor([0, 0, 3.0, 4.0, 0, 0])
    got = merge_state_dicts("ram", [{"w": a}, {"w": b}], base={"w": base})["w"]
    assert got.tolist() == (a + b).tolist()


def test_ram_equals_mergekits_float32_expression_bit_for_bit():
    """mergekit 0.1.5's ram_merge on stacked float32 task vectors, its order of operations;
    splice computes Σ z/max(c, 1) chunk by chunk and must give the same floats."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 700, generator=g) * 0.02  # 210k entries: several chunks
    fts = []
    for i in range(3):
        tau = torch.randn(300, 700, generator=g) * 0.01
        tau[torch.rand(300, 700, generator=g) < 0.2 * i] = 0
        fts.append(base + tau)
    eps = 0.01
    tv = torch.stack([f - base for f in fts]).view(3, -1)
    active = tv.abs() > eps
    counts = active.sum(dim=0, keepdim=True)
    z = tv * active
    merged = ((z * (counts == 1)) + (z * (counts > 1) / counts.clamp(min=1))).sum(dim=0)
    ref = base + merged.reshape_as(base)
    got = merge_state_dicts("ram", [{"w": f} for f in fts], base={"w": base},
                            params={"epsilon": eps})["w"]  # fmt: skip
    assert torch.equal(got, ref)
