"""LiNeS: layer-increasing network scaling of a merged task vector (spec merging.md §6).

A post-merge transform that works beside any method: the merged delta τ of every tensor is
scaled by ``λ(ℓ) = α + β·(ℓ−1)/(L−1)`` for residual block ℓ of L, and by α outside the blocks,
so shallow layers keep more of the pretrained weights. Multi-task merging sets
``α = ‖τ_sum‖₁ / (T·‖τ_MTL‖₁)`` (L1 norms over the whole model, as the authors' code) and tunes β;
single-task editing uses ``α = γ, β = 1 − γ``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergedStat, MergeTransform, transforms
from splice.merge.engine.stats import CHUNK
from splice.merge.methods._sparsify import chunk_slices

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["LiNeS", "LinesAlpha", "lines_scale"]


def lines_scale(layer: int | None, num_layers: int | None, alpha: float, beta: float) -> float:
    """λ = α + β·depth, depth = ``layer/(num_layers−1)`` (0-based block index; 0 outside the
    layer stack, 1 for a one-block stack — :attr:`MergeContext.depth`)."""
    return alpha + beta * MergeContext("", layer=layer, num_layers=num_layers).depth


class LinesAlpha:
    """α = ‖Σ_t τ_t‖₁ / (T·‖τ_MTL‖₁) over all merged tensors, one streaming pass (§6.3)."""

    key = "lines.alpha"

    def __init__(self) -> None:
        self.l1_sum = 0.0
        self.l1_merged = 0.0
        self.num_models = 0

    def observe(
        self,
        name: str,
        base: Tensor | None,
        tensors: list[Tensor],
        merged: Tensor,
        ctx: MergeContext,
    ) -> None:
        assert base is not None
        self.num_models = len(tensors)
        flat = [t.reshape(-1) for t in tensors]
        b, m = base.reshape(-1), merged.reshape(-1)
        for c in chunk_slices(b.numel(), CHUNK):  # scratch: a few chunks, sums in fp64
            tau_sum = sum(t[c] - b[c] for t in flat)
            self.l1_sum += float(tau_sum.abs().sum(dtype=torch.float64))
            self.l1_merged += float((m[c] - b[c]).abs().sum(dtype=torch.float64))

    def end_pass(self) -> bool:
        return True

    def result(self) -> float:
        """α; 1/T when the merged delta is zero (then α has no effect)."""
        if self.l1_merged == 0.0:
            return 1.0 / max(self.num_models, 1)
        return self.l1_sum / (self.num_models * self.l1_merged)


class Params(HyperParams):
    alpha: float | None = Field(
        None,
        description="α: scale of the first block and of tensors outside the blocks; "
        "None = ‖τ_sum‖₁/(T·‖τ_MTL‖₁) (multi-task); γ for single-task editing",
    )
    beta: float = Field(
        description="β: extra scale reached at the last block (tune on validation; "
        "1 − γ for single-task editing); multiplied by the inner method's λ: keep λ = 1"
    )


@transforms.register("lines")
class LiNeS(MergeTransform):
    """LiNeS (Wang et al., ICLR 2025), spec merging.md §6: θ = θ₀ + λ(depth)·(θ_merged − θ₀).

    With ``alpha: 1, beta: 0`` it leaves the method's output unchanged. It scales what the
    inner method returns, so that method's λ multiplies α and β too: keep it at 1, as the
    authors apply LiNeS to the merged task vector without a further λ.
    """

    name: ClassVar[str] = "lines"
    pretty_name: ClassVar[str] = "LiNeS"
    reference: ClassVar[str] = "https://arxiv.org/abs/2410.17146 (spec merging.md §6)"
    Params: ClassVar[type[HyperParams]] = Params

    def global_stats(self, params: Params, num_models: int) -> list[MergedStat]:
        return [LinesAlpha()] if params.alpha is None else []

    def apply(
        self,
        base: Tensor | None,
        merged: Tensor,
        tensors: list[Tensor],
        params: Params,
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        alpha = params.alpha if params.alpha is not None else ctx.stats[LinesAlpha.key]
        scale = lines_scale(ctx.layer, ctx.num_layers, alpha, params.beta)
        if scale == 1.0:  # exact identity, no round trip through θ₀
            return merged
        dt = torch.promote_types(merged.dtype, torch.float32)
        b = base.to(dt)
        return (b + scale * (merged.to(dt) - b)).to(merged.dtype)
