"""Model Stock against mergekit 0.1.5's formula (mean pairwise cosine → t)."""

from __future__ import annotations

import pytest
import torch

from splice.merge import merge_state_dicts
from tests.merge._ckpt import finetune, tiny_llama


def model_stock_ref(base, fts, filter_wise):
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        w0 = b.double()
        ws = [f[name].double() for f in fts]
        shape = w0.shape if filter_wise and w0.dim() > 1 else (1, -1)  # vectors: last axis

        def view(x, shape=shape):
            return x.reshape(shape)

        offs = [view(w) - view(w0) for w in ws]
        cos = []
        for i in range(len(offs)):
            for j in range(i + 1, len(offs)):
                norm = (offs[i].norm(dim=-1) * offs[j].norm(dim=-1)).clamp(min=1e-6)
                cos.append(((offs[i] * offs[j]).sum(-1) / norm).clamp(-1, 1))
        c = torch.stack(cos).mean(0).unsqueeze(-1)
        n = len(ws)
        den = 1 + (n - 1) * c
        t = torch.where(den.abs() < 1e-6, 0.0, n * c / torch.where(den.abs() < 1e-6, 1.0, den))
        avg = sum(view(w) for w in ws) / n
        out[name] = (t * avg + (1 - t) * view(w0)).reshape(b.shape).float()
    return out


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return base, [finetune(base, s) for s in range(3)]


@pytest.mark.parametrize("filter_wise", [False, True])
def test_matches_mergekit_formula(models, filter_wise):
    base, fts = models
    got = merge_state_dicts("model_stock", fts, base=base, params={"filter_wise": filter_wise})
    ref = model_stock_ref(base, fts, filter_wise)
    for n in ref:
        # t = N·c/(1 + (N−1)·c) magnifies fp32 rounding of c on short rows
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5)


def test_orthogonal_offsets_stay_at_the_base_and_opposite_ones_too():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    got = merge_state_dicts("model_stock", [{"w": a}, {"w": b}], base={"w": base})["w"]
    assert got.abs().max() == 0  # cos 0 → t = 0
    same = merge_state_dicts("model_stock", [{"w": a}, {"w": a}], base={"w": base})["w"]
    assert torch.equal(same, a)  # cos 1 → t = 1
    two = base + 2
    opposite = merge_state_dicts("model_stock", [{"w": two + a}, {"w": two - a}], base={"w": two})
    assert torch.equal(opposite["w"], two)  # denominator 0: keep the base
