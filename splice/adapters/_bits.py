"""P6 of spec peft.md §22.2: the normal-codebook STE quantiser and bit packing.

Bi-adapters (§14) store each adapter matrix as ``b``-bit codes of its standardised entries
plus (μ, σ); R-AMT (§13) stores one bit per masked weight. Both pack with :func:`pack_codes`,
``b`` bits per entry, little-endian, with no padding but the last byte's.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "STD_EPS",
    "expand",
    "normal_codebook",
    "pack_codes",
    "packed_bytes",
    "quantize_ste",
    "standardise",
    "unpack_codes",
]

STD_EPS = 1e-5  # Ŵ = (W − μ)/(σ + eps), as the reference code (§14 step 1)


@functools.cache
def _codebook(bits: int) -> tuple[Tensor, Tensor]:
    n = 1 << bits
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = torch.special.ndtri(p)  # start: equal-mass bins
    for _ in range(500):
        thresholds = (levels[1:] + levels[:-1]) / 2
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.special.ndtr(thresholds),
                           torch.ones(1, dtype=torch.float64)])  # fmt: skip
        new = torch.special.ndtri((edges[1:] + edges[:-1]) / 2)
        if torch.equal(new, levels):
            break
        levels = new
    return levels.float(), ((levels[1:] + levels[:-1]) / 2).float()


def normal_codebook(bits: int) -> tuple[Tensor, Tensor]:
    """``(levels, thresholds)`` of the fixed ``2^bits``-level codebook for a standard normal.

    Level i is Φ⁻¹ of the midpoint of bin i's probability mass; thresholds are midpoints of
    adjacent levels; iterated to the fixed point (b=1: levels ±Φ⁻¹(0.75) = ±0.6745, threshold 0).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    levels, thresholds = _codebook(bits)
    return levels.clone(), thresholds.clone()


def standardise(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Ŵ, μ, σ)`` with μ, σ the matrix's mean and (unbiased) std; Ŵ = (W − μ)/(σ + eps)."""
    mu, sigma = w.mean(), w.std()
    return (w - mu) / (sigma + STD_EPS), mu, sigma


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, levels: Tensor, thresholds: Tensor) -> Tensor:
        return levels[torch.bucketize(w, thresholds)]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def quantize_ste(w: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W_q, codes, μ, σ)``: W_q = Q_b(Ŵ)·σ + μ, straight-through to W (also via μ, σ).

    ``codes`` (uint8) index the codebook levels; ``levels[codes]·σ + μ`` is W_q bit for bit.
    """
    levels, thresholds = (t.to(w.device) for t in _codebook(bits))
    z, mu, sigma = standardise(w.float())
    codes = torch.bucketize(z.detach(), thresholds).to(torch.uint8)
    q = _STE.apply(z, levels, thresholds)
    return q * sigma + mu, codes, mu, sigma


def expand(codes: Tensor, bits: int, mu: Tensor, sigma: Tensor) -> Tensor:
    """The dequantised matrix ``levels[codes]·σ + μ`` (the same arithmetic as the forward)."""
    levels = _codebook(bits)[0].to(codes.device)
    return levels[codes.long()] * sigma + mu


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 bytes holding ``bits`` bits per code (the first code in the lowest bits)."""
    flat = codes.reshape(-1).to(torch.uint8).cpu()
    planes = (flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1
    stream = planes.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes :func:`pack_codes` writes for ``count`` codes of ``bits`` bits."""
    return -(-count * bits // 8)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The inverse of :func:`pack_codes`: ``count`` uint8 codes."""
    stream = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    planes = stream[: count * bits].reshape(count, bits)
    return (planes << torch.arange(bits, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
