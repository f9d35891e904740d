"""The asymmetric uniform quantizer with a learnable range and zero-point offset (spec
other.md §4.2, Hubara et al. 2021).

For ``b`` bits, range ``R`` and offset ``m`` (the running minimum, ≤ 0):
``Δ = clamp(R, 1e-6, 1e5) / (2^b − 1)``, ``z = clamp(round(−m/Δ), 0, 2^b − 1)`` (an integer,
so 0 is exactly representable) and ``Q(u) = Δ·(round(clamp(u/Δ + z, 0, 2^b − 1)) − z)``.
Both roundings pass gradients straight through (STE), so ``u``, ``R`` and ``m`` all train;
``u`` outside the clamp range gets no gradient. The rounding forward is ``torch.round``
itself, so the integer codes and ``Δ·(q − z)`` are exactly what a deployed model computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FakeQuant", "codes", "fake_quant", "grid"]


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def grid(rng: Tensor, low: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(Δ, z)``: the step and the integer zero point of range ``rng`` and offset ``low``."""
    top = 2**bits - 1
    delta = rng.clamp(1e-6, 1e5) / top
    zero = _RoundSTE.apply(-low / delta).clamp(0, top)
    return delta, zero


def codes(u: Tensor, delta: Tensor, zero: Tensor, bits: int) -> Tensor:
    """The integer codes ``round(clamp(u/Δ + z, 0, 2^b − 1))`` (as floats, STE gradient)."""
    return _RoundSTE.apply((u / delta + zero).clamp(0, 2**bits - 1))


def fake_quant(u: Tensor, rng: Tensor, low: Tensor, bits: int) -> Tensor:
    """``Q(u)``: ``u`` rounded to the ``bits``-bit grid of (``rng``, ``low``), broadcast
    against ``u`` (per channel or per tensor)."""
    delta, zero = grid(rng, low, bits)
    return delta * (codes(u, delta, zero, bits) - zero)


class FakeQuant(nn.Module):
    """A quantizer with learnable ``range`` and ``low`` of shape ``shape`` (``()``: per tensor;
    ``(C, 1, …)``: per output channel, broadcast against the quantized tensor)."""

    def __init__(self, bits: int, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.bits = bits
        self.range = nn.Parameter(torch.ones(shape))
        self.low = nn.Parameter(torch.zeros(shape))

    @torch.no_grad()
    def init_minmax(self, lo: Tensor, hi: Tensor) -> None:
        """Start from the observed minimum and maximum (min clipped at ≤ 0, max at ≥ 0)."""
        lo, hi = lo.clamp(max=0).reshape(self.low.shape), hi.clamp(min=0).reshape(self.low.shape)
        self.low.copy_(lo)
        self.range.copy_(hi - lo)

    def forward(self, u: Tensor) -> Tensor:
        return fake_quant(u, self.range, self.low, self.bits)

    @torch.no_grad()
    def encode(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes as uint8, Δ, z)`` of ``u``: ``Δ·(codes − z)`` equals ``self(u)`` exactly."""
        delta, zero = grid(self.range, self.low, self.bits)
        return codes(u, delta, zero, self.bits).to(torch.uint8), delta, zero

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.range.shape)}"
