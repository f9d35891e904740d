"""Model Breadcrumbs: drop both tails of each task vector, then add them up (Davari &
Belilovsky, ECCV 2024; mergekit's ``breadcrumbs`` / ``breadcrumbs_ties``).

Per tensor and task vector τ_t = θ_t − θ₀ of n entries, sorted by |τ|: the ⌊γ·n⌋ largest
(outliers) and enough of the smallest are dropped to keep ⌊density·n⌋ entries (if the two
overlap, fewer outliers are dropped). The kept entries are the sorted positions
[n_bot, n_bot + ⌊density·n⌋) with n_bot = max(0, n − ⌊density·n⌋ − ⌊γ·n⌋), found by exact
selection (no sort); entries tied at a cut are taken in index order. ``rescale`` scales the
survivors to keep ‖τ_t‖₁. Then θ = θ₀ + λ·Σ w_t τ̃_t (÷ Σ w_t with ``normalize``), or with
``consensus: ties`` the TIES sign election and disjoint sum/mean (``breadcrumbs_ties``).
The paper's method is this per-layer two-sided mask with task arithmetic; both dialects use
mergekit's defaults (density 1 keeps everything, γ = 0.01, no normalize, no rescale).
mergekit sorts with an unstable sort, so at a cut where |τ| values tie it keeps an arbitrary
subset of them; splice keeps the lowest indices there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.engine.stats import kth_largest_each
from splice.merge.methods._gta import l1_norm, l1_rescale_, sparsify_and_combine
from splice.merge.methods._sparsify import chunk_slices

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["Breadcrumbs", "outlier_window", "rank_window_mask"]


class Params(HyperParams):
    lambda_: float = Field(1.0, alias="lambda", description="λ: scale of the merged task vector")
    consensus: Literal["ties"] | None = Field(
        None, description="null: weighted sum (breadcrumbs); ties: sign election"
    )
    normalize: bool = Field(False, description="divide by the (agreeing) weights' sum")
    rescale: bool = Field(False, description="scale survivors to keep each ‖τ_t‖₁")


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="w_t: this task vector's weight")
    density: float = Field(1.0, ge=0, le=1, description="fraction of entries kept")
    gamma: float = Field(0.01, ge=0, le=1, description="fraction of largest |τ| dropped")


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Sorted positions ``[start, stop)`` (ascending |τ|) breadcrumbs keeps of ``n``."""
    target = int(density * n)
    start = max(0, n - target - int(gamma * n))
    return start, start + target


def rank_window_mask(x: Tensor, start: int, stop: int) -> Tensor:
    """0/1 mask (``x``'s dtype, flat) of the entries at stable ascending-|x| positions
    ``[start, stop)``: exact selection of the two cut values, then, chunk by chunk, the
    entries between them and those tied with a cut whose stable position is inside."""
    flat = x.reshape(-1)
    n = flat.numel()
    if start >= stop:
        return torch.zeros_like(flat)
    ranks = [n - start, n - stop + 1]
    cuts = sorted({float(v) for v in kth_largest_each([flat, flat], ranks, magnitude=True)})
    lo, hi = cuts[0], cuts[-1]
    below = dict.fromkeys(cuts, 0)  # entries under each cut: the first tie's position
    for s in chunk_slices(n):
        a = flat[s].abs()
        for v in cuts:
            below[v] += int((a < v).sum())
    mask = torch.empty_like(flat)
    for s in chunk_slices(n):
        a = flat[s].abs()
        m = ((a > lo) & (a < hi)).to(flat.dtype)
        for v in cuts:
            eq = a == v
            pos = torch.cumsum(eq, 0).add_(below[v] - 1)  # stable position where eq
            m[eq & (pos >= start) & (pos < stop)] = 1
            below[v] += int(eq.sum())
        mask[s] = m
    return mask


@methods.register("breadcrumbs")
class Breadcrumbs(MergeMethod):
    """Two-tailed magnitude mask per tensor, then a weighted sum or TIES (module docstring)."""

    name: ClassVar[str] = "breadcrumbs"
    pretty_name: ClassVar[str] = "Model Breadcrumbs"
    reference: ClassVar[str] = "https://arxiv.org/abs/2312.06795 (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True
    throughput: ClassVar[float] = 40e6

    def scratch_tensors(self, num_models: int) -> float:
        return 1.2  # the mask of one task vector, plus chunk scratch

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None

        def crumbs(tau: Tensor, mp: ModelParams) -> None:
            if mp.density >= 1:
                return
            before = l1_norm(tau) if params.rescale else 0.0
            start, stop = outlier_window(tau.numel(), mp.density, mp.gamma)
            tau.mul_(rank_window_mask(tau, start, stop).reshape(tau.shape))
            if params.rescale:
                l1_rescale_(tau, before)

        return sparsify_and_combine(base, tensors, params, model_params, crumbs)
