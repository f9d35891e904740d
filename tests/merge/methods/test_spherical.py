"""Multi-SLERP, Karcher mean and NuSLERP against mergekit 0.1.5's formulas, written on
stacked float64 tensors (splice works on Gram coefficients instead)."""

from __future__ import annotations

import math

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import merge_state_dicts


def multislerp_ref(tensors, weights, base=None, eps=1e-8, dtype=torch.float64, norm=None):
    """mergekit's formula in ``dtype`` (float32: mergekit's own arithmetic); ``norm`` replaces
    ``torch.norm`` (mergekit's) for the vector norms."""
    norm = norm or (lambda v, **kw: v.norm(**kw))
    x = torch.stack([t.to(dtype).flatten() for t in tensors])
    if base is not None:
        x = x - base.to(dtype).flatten()
    w = torch.tensor(weights, dtype=dtype)
    w = w / w.sum()
    norms = norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / norm(mean)
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tr = (tangent * w[:, None]).sum(0)
    tn = norm(tr) + eps
    res = (mean * torch.cos(tn) + tr * torch.sin(tn) / tn) * (norms.squeeze(-1) * w).sum()
    res = res.reshape(tensors[0].shape)
    return (res if base is None else res + base.to(dtype)).float()


def karcher_ref(tensors, max_iter=10, tol=1e-5):
    xs = [t.double().flatten() for t in tensors]
    norms = [float(x.norm()) for x in xs]
    units = [x / n for x, n in zip(xs, norms, strict=True)]
    a = 1 / len(xs)
    u = sum(a * v for v in units)
    u = u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for v in units:
            d = float(torch.clamp(u @ v, -1, 1))
            th = math.acos(d)
            if th >= tol:
                tangent += a * th / math.sin(th) * (v - d * u)
        tn = float(tangent.norm())
        if tn < tol:
            break
        u = math.cos(tn) * u + math.sin(tn) * tangent / tn
        u = u / u.norm()
    return (sum(norms) / len(xs) * u).reshape(tensors[0].shape).float()


def nuslerp_ref(t, v0, v1):
    a, b = v0.double().flatten(), v1.double().flatten()
    cos = float(torch.clamp((a / a.norm()) @ (b / b.norm()), -1, 1))
    th = math.acos(cos)
    out = (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)
    return out.reshape(v0.shape).float()


def _inputs(n=3, shape=(16, 24)):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def test_multislerp_with_and_without_base():
    base, fts = _inputs()
    ws = [0.5, 0.3, 0.2]
    mps = [{"weight": w} for w in ws]
    sds = [{"w": f} for f in fts]
    got = merge_state_dicts("multislerp", sds, base={"w": base}, model_params=mps)["w"]
    torch.testing.assert_close(got, multislerp_ref(fts, ws, base), atol=1e-6, rtol=0)
    raw = merge_state_dicts("multislerp", sds, model_params=mps)["w"]
    torch.testing.assert_close(raw, multislerp_ref(fts, ws), atol=1e-6, rtol=0)


def test_multislerp_refuses_cancelling_directions():
    v = torch.randn(10, generator=torch.Generator().manual_seed(0))
    sds = [{"w": v}, {"w": -v}, {"w": torch.zeros(10)}]
    with pytest.raises(SpliceError, match="cancel"):
        merge_state_dicts("multislerp", sds, model_params=[{"weight": 1}, {"weight": 1}, {}])
    two = merge_state_dicts("multislerp", sds[:2])["w"]  # two inputs: linear fallback
    assert two.abs().max() < 1e-6


def test_karcher_matches_the_fixed_point_iteration():
    _, fts = _inputs()
    got = merge_state_dicts("karcher", [{"w": f} for f in fts])["w"]
    torch.testing.assert_close(got, karcher_ref(fts), atol=1e-6, rtol=0)
    same = merge_state_dicts("karcher", [{"w": fts[0]}, {"w": 3 * fts[0]}])["w"]
    torch.testing.assert_close(same, 2 * fts[0], atol=1e-5, rtol=1e-6)  # one direction, mean norm


@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_formula(with_base):
    base, (a, b) = _inputs(2)
    mps = [{"weight": 1.0}, {"weight": 3.0}]  # t = 0.75
    got = merge_state_dicts(
        "nuslerp", [{"w": a}, {"w": b}], base={"w": base} if with_base else None, model_params=mps
    )["w"]
    ref = nuslerp_ref(0.75, a - base, b - base) + base if with_base else nuslerp_ref(0.75, a, b)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_nuslerp_row_wise_interpolates_each_vector():
    _, (a, b) = _inputs(2)
    for row_wise, dim in ((False, -1), (True, 0)):
        got = merge_state_dicts(
            "nuslerp",
            [{"w": a}, {"w": b}],
            params={"nuslerp_flatten": False, "nuslerp_row_wise": row_wise},
        )["w"]
        av, bv = a.transpose(dim, -1), b.transpose(dim, -1)
        ref = torch.stack([nuslerp_ref(0.5, x, y) for x, y in zip(av, bv, strict=True)])
        torch.testing.assert_close(got, ref.transpose(dim, -1), atol=1e-6, rtol=0)


def test_multislerp_of_untouched_tensors_is_the_base():
    """All task vectors zero (mergekit raises here): the weighted mean norm is 0, so θ₀."""
    base = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for params in ({}, {"mergekit_norms": True}):
        got = merge_state_dicts("multislerp", [{"w": base}] * 3, base={"w": base}, params=params)
        assert torch.equal(got["w"], base)


def test_gram_matches_float64_and_multislerp_stays_at_float32_rounding():
    """Large tensors (several 65536-column chunks): the Gram matrix agrees with a float64
    one to about 1e-6 of its largest entry, multislerp's output with the float64 formula
    within 1e-6 (splice and mergekit differ by up to 1.4e-4 on the 168M benchmark)."""
    from splice.merge.methods._vectors import gram

    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 1024, generator=g)
    fts = [base + 0.01 * torch.randn(300, 1024, generator=g) for _ in range(3)]
    want = torch.stack([(f - base).double().flatten() for f in fts])
    got = gram(fts, base)[0]
    ref = want @ want.T
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-6
    rows = gram(fts, base, 300)  # per row, as model_stock's filter_wise
    per_row = torch.einsum("irc,jrc->rij", *(2 * [want.reshape(3, 300, 1024)]))
    assert float((rows - per_row).abs().max() / per_row.abs().max()) < 2e-6
    mps = [{"weight": w} for w in (0.5, 0.3, 0.2)]
    out = merge_state_dicts("multislerp", [{"w": f} for f in fts], base={"w": base},
                            model_params=mps)["w"]  # fmt: skip
    exact = multislerp_ref(fts, [0.5, 0.3, 0.2], base).double()
    assert float((out.double() - exact).abs().max()) < 1e-6


def test_multislerp_difference_from_mergekit_is_torch_float32_norm_error():
    """mergekit evaluates the formula in float32, and torch's float32 CPU ``norm`` loses
    accuracy with length (torch 2.13: 1e-5 relative at 1M entries, 2e-3 at the 168M
    fixture's 32.8M-entry embedding, hence its 1.4e-4 max |Δ| there). mergekit's own float32
    formula with exact norms lands where splice does: at output rounding of the float64
    result; with torch's norms it is 100× farther off."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1024, 1024, generator=g) * 0.02
    fts = [base + 0.01 * torch.randn(1024, 1024, generator=g) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    exact = multislerp_ref(fts, w, base).double()

    def err(t):
        return float((t.double() - exact).abs().max())

    def exact_norm(v, **kw):
        return v.double().norm(**kw).float()

    out = merge_state_dicts("multislerp", [{"w": f} for f in fts], base={"w": base},
                            model_params=[{"weight": x} for x in w])["w"]  # fmt: skip
    mergekit = multislerp_ref(fts, w, base, dtype=torch.float32)
    mergekit_exact_norms = multislerp_ref(fts, w, base, dtype=torch.float32, norm=exact_norm)
    assert err(out) < 2e-8 and err(mergekit_exact_norms) < 2e-8
    assert err(mergekit) > 10 * err(out)


def multislerp_mergekit_floats(tensors, weights, base=None, eps=1e-8):
    """mergekit 0.1.5's multislerp step by step in float32 on stacked rows (its order of
    operations, which fixes its floats)."""
    x = torch.stack(tensors)
    if base is not None:
        x -= base
    flat = x.view(len(tensors), -1)
    w = torch.tensor(weights, dtype=x.dtype)
    w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    summed = (tangent * w.view(-1, 1)).sum(0)
    tn = torch.norm(summed) + eps
    res = mean * torch.cos(tn) + summed * (torch.sin(tn) / tn)
    res = (res * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return res if base is None else res + base


@pytest.mark.parametrize(("n", "with_base"), [(2, True), (3, True), (4, False)])
def test_mergekit_norms_land_on_mergekits_multislerp(n, with_base):
    """Long rows (8M entries), where torch's float32 ``norm`` is off by ~5e-4 relative: the
    default stays at the formula and differs from mergekit's floats, ``mergekit_norms``
    lands on them to float32 rounding (each reduction but the norms agrees already)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8192, 1024, generator=g) * 0.02
    fts = [base + 0.01 * torch.randn(8192, 1024, generator=g) for _ in range(n)]
    w = [0.5, 0.3, 0.2, 0.4][:n]
    b = base if with_base else None
    ref = multislerp_mergekit_floats(fts, w, b)
    sds, mps = [{"w": f} for f in fts], [{"weight": x} for x in w]
    bases = {"base": {"w": base}} if with_base else {}
    got = merge_state_dicts("multislerp", sds, model_params=mps, **bases,
                            params={"mergekit_norms": True})["w"]  # fmt: skip
    default = merge_state_dicts("multislerp", sds, model_params=mps, **bases)["w"]
    scale = float((ref - base).abs().max()) if with_base else float(ref.abs().max())
    gap, native_gap = (float((x - ref).abs().max()) / scale for x in (got, default))
    assert gap < 1e-6 and native_gap > 100 * gap  # native: 4e-4 here, 1.4e-4 abs on the 168M


def test_mergekit_recipes_ask_for_mergekits_multislerp_floats(tmp_path):
    from splice.merge.recipe import load_recipe
    from tests.merge._recipes import base_and_finetunes, write_recipe

    paths, _, _ = base_and_finetunes(tmp_path / "models")
    text = "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - model: {ft0}\n"
    text += "    parameters: {{weight: 0.7}}\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n"
    recipe = load_recipe(write_recipe(tmp_path, text, **paths))
    assert recipe.flat_settings()["mergekit_norms"] is True
