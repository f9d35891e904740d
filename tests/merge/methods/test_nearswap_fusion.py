"""NearSwap and Arcee Fusion (two-model methods with a base) against mergekit 0.1.5's formulas."""

from __future__ import annotations

import torch

from splice.merge import merge_state_dicts


def _pair(shape=(20, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + 0.05 * torch.randn(shape, generator=g)


def nearswap_ref(base, other, t):
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


def fusion_ref(base, other):
    """importance = |Δ|·KL(softmax θ₁ ‖ softmax θ₀) per row; threshold median + 1.5·IQR with
    quantile q at sorted index ⌊q·(n − 1)⌋."""
    p = torch.softmax(other.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    imp = ((other - base).abs().double() * (p * (p / q).log()).sum(-1, keepdim=True)).flatten()
    s = imp.sort().values
    q1, med, q3 = (s[int(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    mask = imp.reshape(base.shape) >= med + 1.5 * (q3 - q1)
    return torch.where(mask, other, base)


def test_nearswap_matches_formula_and_limits():
    base, other = _pair()
    for t in (0.0, 0.02, 10.0):
        got = merge_state_dicts("nearswap", [{"w": other}], base={"w": base}, params={"t": t})
        torch.testing.assert_close(got["w"], nearswap_ref(base, other, t), atol=0, rtol=0)
    far = merge_state_dicts("nearswap", [{"w": other}], base={"w": base}, params={"t": 10.0})
    assert torch.equal(far["w"], other)


def test_arcee_fusion_matches_formula():
    base, other = _pair()
    got = merge_state_dicts("arcee_fusion", [{"w": other}], base={"w": base})["w"]
    ref = fusion_ref(base, other)
    assert torch.equal(got, ref)
    moved = (got != base).float().mean()
    assert 0 < float(moved) < 0.2  # only the outliers of the importance distribution move


def test_arcee_fusion_sampled_quantiles_stay_close_to_exact():
    base, other = _pair((200, 300), seed=2)
    exact = merge_state_dicts(
        "arcee_fusion", [{"w": other}], base={"w": base}, params={"sample_size": None}
    )["w"]
    torch.testing.assert_close(exact, fusion_ref(base, other), atol=0, rtol=0)
    sampled = merge_state_dicts(
        "arcee_fusion", [{"w": other}], base={"w": base}, params={"sample_size": 20_000}
    )["w"]
    a, b = float((exact != base).float().mean()), float((sampled != base).float().mean())
    assert abs(a - b) < 0.01
