"""The asymmetric uniform quantizer with a learnable range and zero-point offset (spec
other.md §4.2, Hubara et al. 2021).

For ``b`` bits, range ``R`` and offset ``m`` (the running minimum, ≤ 0):
``Δ = clamp(R, 1e-6, 1e5) / (2^b − 1)``, ``z = clamp(round(−m/Δ), 0, 2^b − 1)`` (an integer,
so 0 is exactly representable) and ``Q(u) = Δ·(round(clamp(u/Δ + z, 0, 2^b − 1)) − z)``.
Both roundings pass gradients straight through (STE), so ``u``, ``R`` and ``m`` all train;
``u`` outside the clamp range gets no gradient. The rounding forward is ``torch.round``
itself, so the integer codes and ``Δ·(q − z)`` are exactly what a deployed model computes.

Memory under autograd: the clamp keeps a one-byte mask for its backward instead of
``u/Δ + z``, and inside :func:`saved_as_codes` an operation that saves a fake-quantized tensor
for backward (a convolution its input and weight) keeps its uint8 codes and recomputes
``Δ·(q − z)`` when backward needs it: the same values bit for bit, a quarter of the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "Coded",
    "FakeQuant",
    "codes",
    "fake_quant",
    "fake_quant_coded",
    "grid",
    "saved_as_codes",
]

Coded = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(Δ·(q − z), q, Δ, z)``: a fake-quantized tensor with its codes, step and zero point."""


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _CodesSTE(torch.autograd.Function):
    """``round(clamp(v, 0, top))`` forward; backward passes the gradient where
    ``0 ≤ v ≤ top`` — what ``clamp`` then a straight-through ``round`` give, bit for bit —
    keeping a one-byte mask of ``v`` instead of ``v`` itself."""

    @staticmethod
    def forward(ctx, v: Tensor, top: int) -> Tensor:
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((v >= 0) & (v <= top))
        return torch.round(v.clamp(0, top))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, torch.zeros((), dtype=grad.dtype)), None


def grid(rng: Tensor, low: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(Δ, z)``: the step and the integer zero point of range ``rng`` and offset ``low``."""
    top = 2**bits - 1
    delta = rng.clamp(1e-6, 1e5) / top
    zero = _RoundSTE.apply(-low / delta).clamp(0, top)
    return delta, zero


def codes(u: Tensor, delta: Tensor, zero: Tensor, bits: int) -> Tensor:
    """The integer codes ``round(clamp(u/Δ + z, 0, 2^b − 1))`` (as floats, STE gradient)."""
    return _CodesSTE.apply(u / delta + zero, 2**bits - 1)


def fake_quant(u: Tensor, rng: Tensor, low: Tensor, bits: int) -> Tensor:
    """``Q(u)``: ``u`` rounded to the ``bits``-bit grid of (``rng``, ``low``), broadcast
    against ``u`` (per channel or per tensor)."""
    return fake_quant_coded(u, rng, low, bits)[0]


def fake_quant_coded(u: Tensor, rng: Tensor, low: Tensor, bits: int) -> Coded:
    """:func:`fake_quant` with the codes, step and zero point it was computed from."""
    delta, zero = grid(rng, low, bits)
    q = codes(u, delta, zero, bits)
    return delta * (q - zero), q, delta, zero


@contextmanager
def saved_as_codes(*coded: Coded) -> Iterator[None]:
    """While active, a tensor ``Δ·(q − z)`` of ``coded`` that an operation saves for its
    backward is kept as its uint8 codes (bits ≤ 8) and recomputed with the same operations
    when backward unpacks it: identical values and gradients, a quarter of the bytes.
    Other saved tensors are kept as they are."""
    if not torch.is_grad_enabled():
        yield
        return

    live = list(coded)  # emptied on exit: every saved tensor keeps a reference to ``pack``

    def pack(t: Tensor):
        for value, q, delta, zero in live:
            same = t.data_ptr() == value.data_ptr() and t.dtype == value.dtype
            if same and t.shape == value.shape and t.stride() == value.stride():
                return q.detach().to(torch.uint8), q.dtype, delta.detach(), zero.detach()
        return t

    def unpack(saved) -> Tensor:
        if isinstance(saved, Tensor):
            return saved
        q, dtype, delta, zero = saved
        return delta * (q.to(dtype) - zero)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        live.clear()


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

    def coded(self, u: Tensor) -> Coded:
        """``self(u)`` with its codes, step and zero point (:func:`saved_as_codes`)."""
        return fake_quant_coded(u, self.range, self.low, self.bits)

    @torch.no_grad()
    def encode(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes as uint8, Δ, z)`` of ``u``: ``Δ·(codes − z)`` equals ``self(u)`` exactly."""
        delta, zero = grid(self.range, self.low, self.bits)
        return codes(u, delta, zero, self.bits).to(torch.uint8), delta, zero

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.range.shape)}"
