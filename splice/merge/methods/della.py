"""DELLA: MagPrune (magnitude-ranked random drop), elect, fuse (Deep et al., 2024;
mergekit's ``della`` / ``della_linear``).

Per task vector τ_t = θ_t − θ₀ and per row (a 1-D tensor is one row; ranks run along the
second axis, as in mergekit), entries are ranked by |τ| (1 = smallest) and each is kept with
probability p = (density − ε) + 2ε·(rank − 1)/(n − 1), so large entries survive more often
and the mean keep rate is ``density``. ``rescale``: ``paper`` divides each survivor by its own
p (unbiased, the paper's rescaling), ``l1`` scales the survivors so ‖τ_t‖₁ is kept
(mergekit), ``off`` none. Then, as for breadcrumbs, ``consensus: ties`` elects signs and takes
the disjoint mean (``della``; ``normalize`` default true) or the plain weighted sum
(``della_linear``), times λ. density ± ε must lie in (0, 1).

The masks come from a per-tensor generator seeded by (seed, tensor name); mergekit draws
from torch's global generator in its own task order, so the two tools' masks differ and only
their statistics can be compared. Rows are ranked a block at a time (one sort each, ranks
scattered from it) so the scratch stays a few MB whatever the tensor size. Equal |τ| rank by
index, lower first (a stable argsort; before 2026-12 torch's unstable argsort decided, which
changed ~1 entry in 10⁵ on the 168M fixture).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._gta import l1_norm, l1_rescale_, sparsify_and_combine

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["Della", "magprune_"]

BLOCK = 1 << 16
"""Entries ranked per block of rows (its temporaries stay in cache and out of the plan)."""


class Params(HyperParams):
    lambda_: float = Field(1.0, alias="lambda", description="λ: scale of the merged task vector")
    consensus: Literal["ties"] | None = Field(
        "ties", description="ties: sign election (della); null: weighted sum (della_linear)"
    )
    normalize: bool = Field(True, description="divide by the (agreeing) weights' sum")
    rescale: Literal["paper", "l1", "off"] = Field(
        "paper", description="paper: ÷ each entry's keep probability; l1: keep ‖τ‖₁ (mergekit)"
    )


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="w_t: this task vector's weight")
    density: float = Field(1.0, ge=0, le=1, description="mean fraction of entries kept")
    epsilon: float = Field(0.15, ge=0, description="ε: keep probabilities span density ± ε")

    @model_validator(mode="after")
    def _inside(self) -> ModelParams:
        d, e = self.density, self.epsilon
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise ValueError(
                f"density ± epsilon must lie in (0, 1), got density {self.density}, "
                f"epsilon {self.epsilon}"
            )
        return self


def _rank_order(block: Tensor) -> Tensor:
    """The indices that sort each row of ``block`` by |τ| along dim 1, equal |τ| by index
    (``argsort(stable=True)``). For float32 rows one int64 key per entry — |τ|'s bits (a
    non-negative float's bits order as integers) above its index — is sorted by numpy (its
    AVX-512 quicksort where the CPU has it: 54 ns per entry against torch's 216 ns here), and
    the index read back from the low half; keys are unique, so an unstable sort gives the
    stable order."""
    if block.dtype != torch.float32 or block[0].numel() != block.shape[1] or block.shape[1] > 2**31:
        return block.abs().argsort(dim=1, stable=True)
    flat = block.reshape(block.shape[0], -1)
    keys = flat.abs().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    keys.bitwise_or_(torch.arange(flat.shape[1], dtype=torch.int64))
    keys.numpy().sort(axis=1)
    return keys.bitwise_and_(0xFFFFFFFF).reshape(block.shape)


def magprune_(
    tau: Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: Literal["paper", "l1", "off"],
) -> Tensor:
    """MagPrune ``tau`` in place (see module docstring)."""
    if density >= 1:
        return tau
    if density <= 0:
        return tau.zero_()
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], tau.shape[1], -1)
    before = l1_norm(tau) if rescale == "l1" else 0.0
    n = rows.shape[1]
    step = max(1, BLOCK // max(1, rows[0].numel()))
    steps = torch.arange(n, dtype=tau.dtype).reshape(1, n, *([1] * (rows.dim() - 2)))
    for r in range(0, rows.shape[0], step):
        block = rows[r : r + step]
        order = _rank_order(block)
        ranks = torch.empty(order.shape, dtype=tau.dtype)
        ranks.scatter_(1, order, steps.expand_as(order))
        prob = ranks.mul_(2 * epsilon / max(n - 1, 1)).add_(density - epsilon)
        keep = torch.rand(prob.shape, generator=generator).lt_(prob).to(tau.dtype)
        block.mul_(keep.div_(prob) if rescale == "paper" else keep)
    if rescale == "l1":
        l1_rescale_(tau, before)
    return tau


@methods.register("della")
class Della(MergeMethod):
    """MagPrune per task vector, then TIES election and mean, or a weighted sum."""

    name: ClassVar[str] = "della"
    pretty_name: ClassVar[str] = "DELLA"
    reference: ClassVar[str] = "https://arxiv.org/abs/2406.11617 (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True
    throughput: ClassVar[float] = 15e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.5

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        gen = ctx.generator()

        def prune(tau: Tensor, mp: ModelParams) -> None:
            magprune_(tau, mp.density, mp.epsilon, gen, params.rescale)

        return sparsify_and_combine(base, tensors, params, model_params, prune)
