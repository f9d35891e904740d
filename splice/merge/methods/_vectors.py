"""Task-vector arithmetic shared by the merge methods (one copy of each step, so the order of
operations, and so the rounding, is the same wherever it is used)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from splice._lazy import lazy_import

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())


__all__ = ["add_scaled", "gram", "linear_combination_", "weighted_sum"]


def weighted_sum(terms: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ w_i·x_i``: the first term scaled in place, then ``+= w_i·x_i`` one term at a time.

    ``terms`` may be a generator (one temporary at a time); the first term is overwritten and
    returned, so it must be a fresh tensor or a buffer the caller may change.
    """
    it = iter(terms)
    acc = next(it).mul_(weights[0])
    for x, w in zip(it, weights[1:], strict=True):
        acc.add_(x, alpha=w)
    return acc


def add_scaled(base: Tensor, delta: Tensor, lam: float, dtype: torch.dtype | None = None) -> Tensor:
    """``θ₀ + λ·Δ`` computed in ``dtype`` (default: Δ's), returned in θ₀'s dtype."""
    return (base.to(dtype or delta.dtype) + lam * delta).to(base.dtype)


def gram(tensors: Sequence[Tensor], base: Tensor | None = None, rows: int = 1) -> Tensor:
    """Gram matrices of the vectors ``t − base`` (``t`` without a base), each tensor viewed as
    ``(rows, -1)``: ``G[r, i, j] = v_i[r]·v_j[r]`` (float64).

    Column chunks of 65536 entries at most go through one reused buffer (no full-size
    temporary); each chunk's products are taken in float32 (float64 inputs: float64), the
    differences in the inputs' dtype, and the chunks' sums are accumulated in float64. A
    float64 product of every chunk costs 3–4× more time; float32 products move G by up to
    ~1e-6 of its largest entry, which moves a cosine or a slerp coefficient as much."""
    views = [t.reshape(rows, -1) for t in tensors]
    b = None if base is None else base.reshape(rows, -1)
    k, cols = len(views), views[0].shape[1]
    dtype = views[0].dtype
    work = torch.promote_types(dtype, torch.float32)
    out = torch.zeros(rows, k, k, dtype=torch.float64)
    step = max(1, (1 << 16) // rows)
    buf = torch.empty(rows, k, min(step, cols), dtype=work)
    for s in range(0, cols, step):
        c = slice(s, s + step)
        block = buf[:, :, : min(step, cols - s)]
        for i, v in enumerate(views):
            if b is None:
                block[:, i].copy_(v[:, c])
            elif dtype == work:
                torch.sub(v[:, c], b[:, c], out=block[:, i])
            else:
                block[:, i].copy_(v[:, c] - b[:, c])  # the difference in the inputs' dtype
        out += (block @ block.transpose(1, 2)).to(torch.float64)
    return out


def linear_combination_(base: Tensor | None, tensors: list[Tensor], coefs: list[float]) -> Tensor:
    """``θ₀ + Σ c_i·(t_i − θ₀)`` (without a base ``Σ c_i·t_i``) written into ``tensors[0]``
    chunk by chunk; the other tensors are only read."""
    flat = [t.reshape(-1) for t in tensors]
    b = None if base is None else base.reshape(-1)
    for s in range(0, flat[0].numel(), 1 << 16):
        cols = slice(s, s + (1 << 16))
        if b is None:  # the first term is flat[0]'s own chunk, overwritten in place
            flat[0][cols] = weighted_sum((f[cols] for f in flat), coefs)
        else:
            flat[0][cols] = weighted_sum((f[cols] - b[cols] for f in flat), coefs).add_(b[cols])
    return tensors[0]
