"""SCE against mergekit 0.1.5's formula (variance top-k, mean-square weights, sign erase)."""

from __future__ import annotations

import pytest
import torch

from splice.merge import merge_state_dicts
from splice.merge.recipe import load_recipe
from tests.merge._ckpt import finetune, tiny_llama
from tests.merge._recipes import base_and_finetunes, write_recipe


def sce_ref(base, fts, topk):
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        tvs = torch.stack([(f[name] - b).double() for f in fts])
        if topk < 1:
            var = tvs.var(dim=0, unbiased=False).flatten()
            k = int(int((var != 0).sum()) * topk)
            mask = torch.zeros_like(var)
            mask[var.argsort(descending=True)[:k]] = 1
            tvs = tvs * mask.reshape(b.shape)
        ms = tvs.square().reshape(len(fts), -1).mean(dim=1)
        alpha = ms / ms.sum() if abs(float(ms.sum())) >= 1e-6 else torch.full_like(ms, 1 / len(fts))
        alpha = alpha.reshape(-1, *[1] * b.dim())
        sign = torch.where(tvs.sum(0) >= 0, 1.0, -1.0).double()
        erased = alpha * (tvs.sign() == sign)
        merged = (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
        out[name] = (b.double() + merged).float()
    return out


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    return base, [finetune(base, s, scale=0.05 * (s + 1)) for s in range(3)]


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_matches_mergekit_formula(models, topk):
    base, fts = models
    got = merge_state_dicts("sce", fts, base=base, params={"select_topk": topk})
    ref = sce_ref(base, fts, topk)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0)


def test_selection_zeroes_low_variance_positions(models):
    base, fts = models
    got = merge_state_dicts("sce", fts, base=base, params={"select_topk": 0.1})
    name = "model.layers.0.mlp.up_proj.weight"
    moved = (got[name] != base[name]).float().mean()
    assert 0.05 < float(moved) <= 0.1


def test_positions_tied_with_the_variance_cut_are_all_kept():
    """mergekit's ``topk`` keeps exactly k positions and picks an arbitrary subset of those
    whose variance ties with the k-th; splice keeps every tied position (the one difference
    from mergekit on the 168M benchmark, docs/merging-methods.md)."""
    base = torch.zeros(1, 8)
    # variances per position: 4 distinct large ones, then 4 equal ones at the cut
    big = torch.tensor([[8.0, 7.0, 6.0, 5.0, 1.0, 1.0, 1.0, 1.0]])
    fts = [base + big, base - big]
    got = merge_state_dicts("sce", [{"w": f} for f in fts], base={"w": base},
                            params={"select_topk": 5 / 8})["w"]  # fmt: skip
    # k = 5 of 8 non-zero variances; the 5th ties with three more: all 8 stay selected
    sel = merge_state_dicts("sce", [{"w": f} for f in fts], base={"w": base},
                            params={"select_topk": 3 / 8})["w"]  # fmt: skip
    # sign election over ±τ sums to 0 → +; the + model's entries survive
    assert torch.equal(got, big)
    assert torch.equal(sel, torch.tensor([[8.0, 7.0, 6.0, 0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("count", [2, 3, 5])
def test_variance_is_torch_var_bit_for_bit(count):
    """mergekit selects by ``torch.var`` of the stacked task vectors; splice's element-wise
    Welford update must give the same floats, or positions at the cut would differ."""
    from splice.merge.methods.sce import _variance

    g = torch.Generator().manual_seed(count)
    chunk = [torch.randn(1 << 16, generator=g) * 10.0**-i + i * 1e-3 for i in range(count)]
    chunk[0][:100] = chunk[1][:100]  # equal entries: a zero term in the update
    assert torch.equal(_variance(chunk), torch.var(torch.stack(chunk), dim=0, unbiased=False))


def sce_mergekit(base, fts, topk):
    """mergekit 0.1.5's sce_merge as it is written: float32 stacked task vectors, torch.var,
    torch.topk of the variance, float32 whole-tensor mean squares."""
    tvs = torch.stack([f - base for f in fts], dim=0)
    if topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
        mask = torch.zeros_like(var)
        mask.view(-1)[indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    sign = tvs.sign()
    erase = sign == ((tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1)
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    erased = w.view(-1, *[1] * base.dim()) * erase
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def _tied_inputs():
    """Three 300×700 fine-tunes (several chunks) on a 1/64 grid: many variances tie with the
    cut, so mergekit's torch.topk keeps only some of the tied positions."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 700, generator=g) * 0.02
    fts = [base + torch.randint(-3, 4, (300, 700), generator=g) / 64 for _ in range(3)]
    return base, fts


def test_mergekit_exact_is_mergekits_output_bit_for_bit():
    base, fts = _tied_inputs()
    for topk in (0.3, 1.0):
        ref = sce_mergekit(base, fts, topk)
        params = {"select_topk": topk, "mergekit_exact": True}
        got = merge_state_dicts("sce", [{"w": f} for f in fts], base={"w": base}, params=params)
        assert torch.equal(got["w"], ref)
    # the default keeps every position tied with the cut: more than mergekit's k
    ref = sce_mergekit(base, fts, 0.3)
    all_tied = merge_state_dicts("sce", [{"w": f} for f in fts], base={"w": base},
                                 params={"select_topk": 0.3})["w"]  # fmt: skip
    assert int((all_tied != base).sum()) > int((ref != base).sum())


def test_mergekit_recipes_ask_for_mergekits_floats(tmp_path):
    paths, _, _ = base_and_finetunes(tmp_path / "models")
    text = "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {ft0}\n  - model: {ft1}\n"
    recipe = load_recipe(
        write_recipe(tmp_path, text + "parameters: {{select_topk: 0.5}}\n", **paths)
    )
    assert recipe.flat_settings()["mergekit_exact"] is True
