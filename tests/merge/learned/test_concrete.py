"""Concrete subspace merging (merging.md §11): the mask, its limits, both inner merges."""

from __future__ import annotations

import torch

from splice.merge.learned.concrete import concrete, concrete_mask, rescale

from ._toys import TASKS, deltas, heads, inputs, mlp


def test_mask_at_temperature_to_zero_is_binary_with_keep_probability_sigmoid():
    g = torch.Generator().manual_seed(0)
    logits = torch.full((40000,), 1.0)

    def non_binary(m: torch.Tensor) -> float:
        return float((torch.minimum(m, 1 - m) > 1e-6).float().mean())

    fractions = [non_binary(concrete_mask(logits, tau, g)) for tau in (1.0, 0.1, 0.01, 1e-3)]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > 0.9
    m = concrete_mask(logits, 1e-8, g)
    assert non_binary(m) == 0.0
    assert abs(float(m.round().mean()) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.01
    soft = concrete_mask(logits, 0.5, g)
    assert bool(((soft > 0) & (soft < 1)).any())


def test_mask_is_differentiable_in_the_logits():
    logits = torch.zeros(10, requires_grad=True)
    concrete_mask(logits, 0.5, torch.Generator().manual_seed(1)).sum().backward()
    assert bool((logits.grad > 0).all())


def test_rescale_divides_by_the_tensor_mean():
    m = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    torch.testing.assert_close(rescale(m), m / 0.5)
    assert torch.equal(rescale(torch.zeros(3)), torch.zeros(3))


def test_keep_everything_mask_with_no_steps_is_task_arithmetic_at_scale():
    module = mlp()
    ds = deltas(module)
    out = concrete(module, ds, inputs(), heads=heads(), steps=0, init_logit=60.0)
    for n, p in module.state_dict().items():
        torch.testing.assert_close(out.weights[n], p + 0.3 * sum(ds[t][n] for t in TASKS))


def test_concrete_ta_reduces_entropy_and_is_seeded():
    module, hs, x = mlp(), heads(), inputs()
    ds = deltas(module)
    out = concrete(module, ds, x, heads=hs, steps=40, mask_lr=0.1, batch_size=8)
    assert sum(out.history[-5:]) / 5 < 0.8 * out.history[0]
    assert out.info["mask_keep"] != 0.5 and out.info["num_mask_logits"] == sum(
        p.numel() for p in module.parameters()
    )
    again = concrete(module, ds, x, heads=hs, steps=40, mask_lr=0.1, batch_size=8)
    assert all(torch.equal(out.weights[n], again.weights[n]) for n in out.weights)


def test_concrete_adamerging_meta_learns_the_mask_then_fits_coefficients():
    module, hs, x = mlp(), heads(), inputs()
    out = concrete(
        module, deltas(module), x, heads=hs, inner="adamerging", steps=20, mask_lr=0.1,
        adamerging_steps=30, adamerging_lr=0.05, batch_size=8,
    )  # fmt: skip
    assert len(out.history) == 50
    meta, final = out.history[:20], out.history[20:]
    assert sum(meta[-5:]) / 5 < meta[0]
    assert sum(final[-5:]) / 5 < final[0]
    c = out.coefficients
    assert c.shape == (6, 3) and not torch.allclose(c, torch.full_like(c, 0.3))
    discrete = concrete(module, deltas(module), x, heads=hs, steps=0, discrete=True)
    w = discrete.weights["0.weight"] - module.state_dict()["0.weight"]
    assert bool((w == 0).any())  # a Bernoulli draw drops entries
