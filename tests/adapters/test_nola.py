"""NOLA (spec §3): seeded bases are regenerated, never stored, and their gradient is exact."""

from __future__ import annotations

import math

import pytest
import torch

from splice.adapters import inject, set_basis_cache, trainable_parameters
from splice.adapters._primitives import _CACHE, _basis_chunks, seeded_combination

from .conftest import make_model

CONTRACT_CASES = {"nola": dict(r=4, k=16, l=16, dropout=0.1)}  # for test_contract.py


def explicit_bases(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    return torch.cat([b for _, b in _basis_chunks(seed, n, numel, 1 / math.sqrt(n), "cpu")])


def test_bases_regenerate_identically_and_leave_global_rng_alone():
    c = torch.randn(7)
    state = torch.get_rng_state()
    a = seeded_combination(c, 42, (3, 5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, seeded_combination(c, 42, (3, 5)))
    assert not torch.equal(a, seeded_combination(c, 43, (3, 5)))


def test_bases_are_uniform_scaled_by_one_over_sqrt_n():
    bases = explicit_bases(0, 64, (32, 32))
    assert bases.abs().max() <= 1 / math.sqrt(64)
    assert abs(bases.std().item() - (1 / math.sqrt(64)) / math.sqrt(3)) < 2e-3


def test_custom_backward_equals_autograd_on_materialised_bases():
    shape = (6, 700)  # several chunks of bases would not change the numbers
    c1 = torch.randn(50, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_(True)
    upstream = torch.randn(shape)
    (seeded_combination(c1, 7, shape) * upstream).sum().backward()
    explicit = (c2 @ explicit_bases(7, 50, shape)).view(shape)
    (explicit * upstream).sum().backward()
    assert torch.allclose(seeded_combination(c1, 7, shape), explicit, atol=1e-6)
    assert torch.allclose(c1.grad, c2.grad, atol=1e-5)


def test_checkpoint_holds_coefficients_and_seeds_only(tmp_path):
    from safetensors.torch import load_file

    from splice.adapters import save_adapter

    model, _ = make_model("linear")
    inject(model, "nola", ["proj"], r=4, k=16, l=8)
    assert trainable_parameters(model).trainable == 3 * (16 + 8)
    save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "splice_adapter.safetensors")
    assert sorted({k.rsplit(".", 1)[1] for k in saved}) == ["coef_A", "coef_B", "seeds"]
    assert sum(t.numel() for t in saved.values()) == 3 * (16 + 8 + 3)


def test_dead_start_avoided_b_gets_gradient_at_step_zero():
    model, x = make_model("linear")
    inject(model, "nola", ["proj"], r=4, k=16, l=16)
    model(x).sum().backward()
    adapter = model.layers[0]["proj"].adapter
    assert adapter.coef_B.grad.abs().sum() > 0


@pytest.fixture
def cache_budget():
    """Set the basis cache's budget for one test; restores it (and empties the cache) after."""
    before = _CACHE.max_bytes
    yield set_basis_cache
    set_basis_cache(0)
    set_basis_cache(before)


def _forward_backward(x):
    model, _ = make_model("linear")
    inject(model, "nola", ["proj"], r=4, k=40, l=24)
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = torch.Generator().manual_seed(len(n))
            p.data.copy_(torch.randn(p.shape, generator=g))
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_cached_and_regenerated_bases_give_identical_outputs_and_gradients(cache_budget):
    x = torch.randn(2, 5, 8)
    cache_budget(0)
    y0, g0 = _forward_backward(x)
    assert not _CACHE.entries
    cache_budget(1 << 20)
    y1, g1 = _forward_backward(x)
    assert _CACHE.entries  # the bases and A₀ were kept ...
    y2, g2 = _forward_backward(x)  # ... and served from the cache
    assert torch.equal(y0, y1) and torch.equal(y0, y2)
    for n in g0:
        assert torch.equal(g0[n], g1[n]) and torch.equal(g0[n], g2[n]), n


def test_cache_evicts_least_recently_used_within_its_budget(cache_budget):
    n, shape = 16, (4, 32)  # one basis set: 16·128·4 B = 8 KiB
    one = 4 * n * math.prod(shape)
    cache_budget(2 * one)
    c = torch.randn(n)
    first = seeded_combination(c, 1, shape)
    seeded_combination(c, 2, shape)
    seeded_combination(c, 1, shape)  # 1 is now the most recent
    seeded_combination(c, 3, shape)  # evicts 2
    seeds = sorted(key[1] for key in _CACHE.entries)
    assert seeds == [1, 3] and _CACHE.bytes == 2 * one <= _CACHE.max_bytes
    seeded_combination(torch.randn(4 * n), 4, (8, 32))  # larger than the budget: not kept
    assert sorted(key[1] for key in _CACHE.entries) == [1, 3]
    assert torch.equal(seeded_combination(c, 1, shape), first)
    with pytest.raises(ValueError, match="≥ 0"):
        set_basis_cache(-1)
