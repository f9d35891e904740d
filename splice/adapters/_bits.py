"""P6 of spec peft.md §22.2: the normal-codebook STE quantiser and bit packing.

Bi-adapters (§14) store each adapter matrix as ``b``-bit codes of its standardised entries
plus (μ, σ); R-AMT (§13) stores one bit per masked weight. Both pack with :func:`pack_codes`,
``b`` bits per entry, little-endian, with no padding but the last byte's.
:class:`PackedMatrices` is the save/load and forward-weight logic the 1-bit adapters share
(Bi-LoRA, Bi-head, Bi-AdaptFormer).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor, nn

from splice.errors import SpliceError

__all__ = [
    "STD_EPS",
    "PackedMatrices",
    "expand",
    "normal_codebook",
    "pack_codes",
    "packed_bytes",
    "quantize_ste",
    "small_nonzero_",
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


def small_nonzero_(w: Tensor, std: float) -> Tensor:
    """Up's init for a quantised adapter: TruncNormal(0, std², ±2·std), in place (§14: Up must
    be non-zero, as standardising a zero matrix divides by zero)."""
    return nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


class PackedMatrices:
    """Mixin for a module whose matrices ``packed_roles`` (parameter paths, e.g. ``"up"``)
    are used and stored at ``self.bits`` bits.

    :meth:`quantised` is the matrix the forward uses (Q_b(·)·σ + μ, straight-through). The
    saved form (:meth:`saved_tensors`) is one uint8 tensor ``packed``: each matrix's packed
    codes in turn (each from a byte boundary), then the float32 bytes of (μ, σ) of each — one
    header entry per site; any other trainable parameter (a learned scale) is saved as
    itself. :meth:`load_saved` expands the codes once; the module then uses the expanded
    matrices as they are (a loaded adapter is not re-quantised).
    """

    packed_roles: ClassVar[tuple[str, ...]] = ()
    bits: int
    _loaded: Tensor | None = None  # the file's packed bytes once loaded

    def quantised(self, role: str) -> Tensor:
        param = self.get_parameter(role)
        return param if self._loaded is not None else quantize_ste(param, self.bits)[0]

    def _others(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.named_parameters() if n not in self.packed_roles}

    def saved_tensors(self) -> dict[str, Tensor]:
        packed = self._loaded
        if packed is None:
            codes, stats = [], []
            for role in self.packed_roles:
                _, q, mu, sigma = quantize_ste(self.get_parameter(role), self.bits)
                codes.append(pack_codes(q, self.bits))
                stats += [mu, sigma]
            raw = torch.stack(stats).detach().float().cpu().view(torch.uint8)
            packed = torch.cat([*codes, raw])
        return {"packed": packed.clone(), **{n: p.detach() for n, p in self._others().items()}}

    def load_saved(self, tensors: dict[str, Tensor], where: str) -> None:
        packed = tensors["packed"]
        params = [self.get_parameter(role) for role in self.packed_roles]
        sizes = [packed_bytes(p.numel(), self.bits) for p in params]
        need = sum(sizes) + 8 * len(params)
        if packed.dtype != torch.uint8 or packed.numel() != need:
            shapes = " and ".join(str(tuple(p.shape)) for p in params)
            raise SpliceError(
                f"the file holds {packed.numel()} bytes; a {1 << self.bits}-level codebook for "
                f"{shapes} needs {need} (codes, then μ and σ of each)",
                where=where,
                fix="load the adapter with the bits it was saved with",
            )
        *parts, raw = packed.split([*sizes, 8 * len(params)])
        stats = raw.clone().view(torch.float32)
        with torch.no_grad():
            for i, (param, part) in enumerate(zip(params, parts, strict=True)):
                q = unpack_codes(part, self.bits, param.numel()).reshape(param.shape)
                param.copy_(expand(q.to(param.device), self.bits, stats[2 * i], stats[2 * i + 1]))
            for name, param in self._others().items():
                param.copy_(tensors[name])
        self._loaded = packed.clone()
