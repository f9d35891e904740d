"""Arcee Fusion: keep the base except where the other model moved a lot *and* its rows'
output distribution changed (Arcee's MergeKit method; mergekit's ``arcee_fusion``).

Per tensor, with θ₀ the base and θ₁ the other model: importance = |θ₁ − θ₀| · KL(p ‖ q) with
p = softmax(θ₁) + 1e-8 and q = softmax(θ₀) + 1e-8 along the last axis (one KL per row; a
1-D tensor is one row). The threshold is median + 1.5·IQR of the importances, each quantile
taken as the sorted value at index ⌊q·(n − 1)⌋; above ``sample_size`` entries (mergekit: 1M)
the quantiles come from that many entries drawn with replacement (the per-tensor generator
of (seed, tensor name); mergekit draws from torch's global generator, so on large tensors
the two tools' thresholds differ slightly), ``sample_size: null`` uses every entry.
θ = θ₀ + (θ₁ − θ₀)·[importance ≥ threshold]. There is no paper: both dialects are mergekit's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.engine.stats import kth_smallest

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["ArceeFusion", "importance"]

ROWS = 1 << 16
"""Entries per block of rows whose softmax is taken at once."""


class Params(HyperParams):
    sample_size: int | None = Field(
        1_000_000, ge=1, description="quantiles from this many sampled entries; null: all"
    )


def importance(other: Tensor, base: Tensor) -> Tensor:
    """|θ₁ − θ₀| · KL(softmax θ₁ ‖ softmax θ₀) per row, same shape as the inputs."""
    width = other.shape[-1] if other.dim() else 1
    a, b = other.reshape(-1, width), base.reshape(-1, width)
    out = torch.empty_like(a)
    step = max(1, ROWS // width)
    for r in range(0, a.shape[0], step):
        x, y = a[r : r + step], b[r : r + step]
        p = torch.softmax(x, dim=-1) + 1e-8
        q = torch.softmax(y, dim=-1) + 1e-8
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        out[r : r + step] = (x - y).abs_() * kl
    return out.reshape(other.shape)


def _threshold(scores: Tensor, sample_size: int | None, gen: torch.Generator) -> Tensor:
    flat = scores.reshape(-1)
    if sample_size is not None and flat.numel() > sample_size:
        flat = flat[torch.randint(flat.numel(), (sample_size,), generator=gen)]
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()
    q1, median, q3 = (kth_smallest(flat, int(i) + 1) for i in idx)
    return median + 1.5 * (q3 - q1)


@methods.register("arcee_fusion")
class ArceeFusion(MergeMethod):
    """Base + the other model's delta where its KL-weighted importance is an outlier."""

    name: ClassVar[str] = "arcee_fusion"
    pretty_name: ClassVar[str] = "Arcee Fusion"
    reference: ClassVar[str] = "https://arcee.ai (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    num_models: ClassVar[tuple[int, int | None]] = (1, 1)
    throughput: ClassVar[float] = 40e6

    def scratch_tensors(self, num_models: int) -> float:
        return 1.3

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        other = tensors[0]
        scores = importance(other, base)
        thr = _threshold(scores, params.sample_size, ctx.generator())
        mask = scores.ge_(thr).to(other.dtype)
        return other.sub_(base).mul_(mask).add_(base)
