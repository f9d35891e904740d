"""Linear-algebra helpers shared by the SVD-based merge methods (DC-Merge, DO-Merging)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from splice._lazy import lazy_import

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())


__all__ = ["compute_dtype", "polar", "safe_unit_rows", "stack_deltas"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: SVDs and sums run in fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def stack_deltas(base: Tensor, tensors: list[Tensor]) -> Tensor:
    """Task vectors ``θ_t − θ_0`` stacked to ``(T, *shape)`` in the compute dtype."""
    dt = compute_dtype(base.dtype)
    b = base.to(dt)
    return torch.stack([t.to(dt) - b for t in tensors])


def polar(x: Tensor) -> Tensor:
    """Orthonormal polar factor ``P Qᵀ`` of ``x = P S Qᵀ``: the nearest matrix with orthonormal
    columns (tall ``x``) or rows (wide ``x``), spec merging.md §16.9."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def safe_unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(norms, x / norms)`` per row of a 2-D tensor; zero rows stay zero."""
    norms = torch.linalg.vector_norm(x, dim=1)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(1)
    return norms, unit
