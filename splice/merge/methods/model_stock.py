"""Model Stock: interpolate the fine-tunes' average toward the base by their angle (Jang et
al., ECCV 2024; mergekit's ``model_stock``).

For N ≥ 2 fine-tunes with offsets τ_i = θ_i − θ₀, c = the mean over pairs i < j of
cos(τ_i, τ_j) (each clamped to [−1, 1], norms' product floored at 1e-6), over the whole
tensor or, with ``filter_wise``, per vector along the last axis (a 1-D tensor is one). With
t = N·c / (1 + (N − 1)·c): θ = t · mean_i θ_i + (1 − t) · θ₀, and θ₀ where the denominator is
below 1e-6 (mergekit 0.1.5). The paper derives t for two models from their angle; for more
it uses one angle, which mergekit (and splice) take as the mean pairwise cosine.
Dot products and norms are float32 per chunk, accumulated in float64 (mergekit reduces whole
tensors in the compute dtype), so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._sparsify import chunk_slices
from splice.merge.methods._vectors import gram

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["ModelStock"]


class Params(HyperParams):
    filter_wise: bool = Field(False, description="one angle per row instead of per tensor")


@methods.register("model_stock")
class ModelStock(MergeMethod):
    """t·mean(θ_i) + (1 − t)·θ₀ with t from the mean pairwise cosine of the offsets."""

    name: ClassVar[str] = "model_stock"
    pretty_name: ClassVar[str] = "Model Stock"
    reference: ClassVar[str] = "https://arxiv.org/abs/2403.19522 (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    num_models: ClassVar[tuple[int, int | None]] = (2, None)
    delta_only: ClassVar[bool] = True  # θ₀ + t·mean τ_i, t from the τ_i
    throughput: ClassVar[float] = 60e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.2

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        per_row = params.filter_wise and base.dim() > 1
        shape = (base.numel() // base.shape[-1], -1) if per_row else (1, -1)
        rows, b = [t.reshape(shape) for t in tensors], base.reshape(shape)
        g = gram(rows, b, rows[0].shape[0])
        step = max(1, (1 << 16) // rows[0].shape[0])
        norms = g.diagonal(dim1=1, dim2=2).sqrt()
        cos = [
            (g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
            for i in range(len(rows))
            for j in range(i + 1, len(rows))
        ]
        c = torch.stack(cos).mean(dim=0)
        count = len(rows)
        den = 1 + (count - 1) * c
        t = torch.where(den.abs() < 1e-6, 0.0, count * c / den.where(den.abs() >= 1e-6, 1.0))
        t = t.to(base.dtype).reshape(-1, 1)
        for s in chunk_slices(b.shape[1], step):
            avg = rows[0][:, s].clone()
            for r in rows[1:]:
                avg += r[:, s]
            avg /= count
            rows[0][:, s] = t * avg + (1 - t) * b[:, s]
        return tensors[0]
