"""The quantizer of spec other.md §4.2: grid, zero point, clamping and STE gradients by hand."""

from __future__ import annotations

import torch

from splice.compress import FakeQuant, fake_quant
from splice.compress.quantizer import grid


def test_zero_is_exactly_representable_for_any_range():
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        low = -torch.rand(100, generator=gen) * 3
        rng = torch.rand(100, generator=gen) * 5 + 1e-3
        zeros = fake_quant(torch.zeros(100), rng, low, bits)
        assert torch.equal(zeros, torch.zeros(100))
        _delta, zero = grid(rng, low, bits)
        assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= 2**bits - 1).all()


def test_values_clamp_gradients_by_hand():
    # R = 3, m = -1, 2 bits: Δ = 1, z = 1, grid {-1, 0, 1, 2}
    u = torch.tensor([-2.5, 0.3, 1.6, 5.0], requires_grad=True)
    rng = torch.tensor(3.0, requires_grad=True)
    low = torch.tensor(-1.0, requires_grad=True)
    out = fake_quant(u, rng, low, 2)
    assert out.tolist() == [-1.0, 0.0, 2.0, 2.0]
    out.sum().backward()
    # STE: dQ/du = 1 inside the clamp range, 0 outside
    assert u.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # Q = Δ(q − z): inside, dQ/dΔ = (q − z) − u/Δ; clamped, dQ/dΔ = (q − z) − m/Δ (via z)
    delta, z, m = 1.0, 1.0, -1.0
    d_delta = [
        (0 - z) - m / delta,
        (1 - z) - 0.3 / delta,
        (3 - z) - 1.6 / delta,
        (3 - z) - m / delta,
    ]
    assert torch.allclose(rng.grad, torch.tensor(sum(d_delta) / 3))  # dΔ/dR = 1/(2^b − 1)
    # dQ/dm = −Δ·dz/dm = 1 on clamped elements, 0 inside (q and z move together)
    assert torch.allclose(low.grad, torch.tensor(2.0))


def test_per_channel_ranges_broadcast():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-4.0, 0.0, 4.0, 8.0]])
    fq = FakeQuant(2, (2, 1))
    fq.init_minmax(w.min(1).values, w.max(1).values)
    out = fq(w)
    assert torch.equal(out[0], torch.tensor([0.0, 1.0, 2.0, 3.0]))  # Δ = 1
    assert torch.equal(out[1], torch.tensor([-4.0, 0.0, 4.0, 8.0]))  # Δ = 4, z = 1


def test_encode_gives_codes_of_the_fake_quant_value():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=gen)
    fq = FakeQuant(4, (6, 1))
    fq.init_minmax(w.min(1).values, w.max(1).values)
    q, delta, zero = fq.encode(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert torch.equal(delta * (q.float() - zero), fq(w))
