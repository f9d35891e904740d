"""Task-vector arithmetic shared by the merge methods (one copy of each step, so the order of
operations, and so the rounding, is the same wherever it is used)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor


__all__ = ["add_scaled", "weighted_sum"]


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
