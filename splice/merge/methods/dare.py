"""DARE: drop and rescale task vectors, then combine them (Yu et al., ICML 2024; merging.md §3).

Each entry of τ_t = θ_t − θ₀ is dropped with probability ``p`` and the survivors rescaled by
1/(1−p), so E[τ̃_t] = τ_t; the masks come from a per-tensor RNG seeded by (seed, tensor name).
Then ``consensus: null`` sums the weighted τ̃_t like Task Arithmetic (mergekit ``dare_linear``)
and ``consensus: ties`` runs TIES on the τ̃_t as MergeLM and FusionBench do (Errata of §3.4):
the full TIES trim (keep the top ``trim`` = 20 % of each |τ̃_t| over the whole model), sign
election, disjoint merge; ``trim: 1`` skips the trim (mergekit ``dare_ties``, which its recipe
dialect selects). θ = θ₀ + λ·τ_m. ``rescale: l1`` matches mergekit's dare (survivors scaled to
keep ‖τ_t‖₁), ``off`` is the paper's DropOnly ablation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from splice.merge.base import GlobalStat, HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._sparsify import (
    Aggregate,
    Rescale,
    chunk_slices,
    dare_drop_,
    disjoint_merge,
    elect_sign,
    trim,
)
from splice.merge.methods.ties import (
    MAJORITY,
    THRESHOLDS,
    MagnitudeThresholds,
    MajoritySign,
    trim_thresholds,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Dare", "dropped_chunks"]


class Params(HyperParams):
    lambda_: float = Field(1.0, alias="lambda", description="λ: scale of the merged task vector")
    consensus: Literal["ties"] | None = Field(
        None, description="null: weighted sum (dare_linear); ties: sign election (dare_ties)"
    )
    rescale: Rescale = Field(
        "paper", description="paper: ×1/(1−p); l1: keep ‖τ‖₁ (mergekit); off: DropOnly"
    )
    aggregate: Aggregate | None = Field(
        None,
        description="sum or mean (÷Σw) of the kept deltas; max with ties; "
        "default sum without consensus, mean with ties",
    )
    zero_sign: Literal["majority", "positive"] = Field(
        "majority", description="with ties: sign where the elected sum is 0"
    )
    trim: float | None = Field(
        None,
        gt=0,
        le=1,
        description="with ties: fraction of each |τ̃_t| the TIES trim keeps after the drop "
        "(default 0.2, MergeLM/FusionBench; 1: no trim, mergekit's dare_ties)",
    )
    scope: Literal["global", "tensor"] = Field(
        "global", description="with ties: trim threshold over the whole model or per tensor"
    )

    @model_validator(mode="after")
    def _max_needs_ties(self) -> Params:
        if self.aggregate == "max" and self.consensus is None:
            raise ValueError("aggregate: max needs consensus: ties")
        if self.trim is not None and self.consensus is None:
            raise ValueError("trim needs consensus: ties")
        return self

    @property
    def density(self) -> float:
        """The trim's kept fraction: 1 (no trim) without consensus."""
        if self.consensus is None:
            return 1.0
        return 0.2 if self.trim is None else self.trim

    @property
    def combine(self) -> Aggregate:
        return self.aggregate or ("sum" if self.consensus is None else "mean")


class ModelParams(HyperParams):
    p: float = Field(ge=0, le=1, description="drop rate: probability of dropping each entry")
    weight: float = Field(1.0, description="w_t: this task vector's weight")


def _dropped(
    base: Tensor, tensors: list[Tensor], ctx: MergeContext, inplace: bool = False
) -> Iterator[Tensor]:
    """τ̃_t flattened, model after model: one generator per tensor name draws the masks in
    input order, so every pass sees the same drops; ``inplace`` turns ``tensors`` into τ̃_t."""
    params, model_params = ctx.params, ctx.model_params
    assert isinstance(params, Params) and model_params is not None
    gen = ctx.generator()
    for t, mp in zip(tensors, model_params, strict=True):
        tau = t.sub_(base) if inplace else t - base
        yield dare_drop_(tau, mp.p, gen, params.rescale).reshape(-1)
        del tau  # freed (once the caller drops it too) before the next one is made


def dropped_chunks(
    base: Tensor, tensors: list[Tensor], ctx: MergeContext, inplace: bool = True
) -> Iterator[tuple[slice, list[Tensor]]]:
    """``(slice, [w_t·trim(DARE(τ_t))])`` chunk by chunk (the trim only with
    ``consensus: ties``); ``inplace`` turns ``tensors`` into τ̃_t."""
    params, model_params = ctx.params, ctx.model_params
    assert isinstance(params, Params) and model_params is not None
    deltas = list(_dropped(base, tensors, ctx, inplace))
    thresholds = [0.0] * len(deltas)
    if params.density < 1:
        densities = [params.density] * len(deltas)
        thresholds = trim_thresholds(deltas, densities, params.scope, ctx, "trim")
    for s in chunk_slices(deltas[0].numel()):
        yield (
            s,
            [
                trim(d[s], thr).mul(mp.weight)
                for d, thr, mp in zip(deltas, thresholds, model_params, strict=True)
            ],
        )


@methods.register("dare")
class Dare(MergeMethod):
    """DARE drop-and-rescale, then a weighted sum or TIES consensus (see module docstring)."""

    name: ClassVar[str] = "dare"
    pretty_name: ClassVar[str] = "DARE"
    reference: ClassVar[str] = "https://arxiv.org/abs/2311.03099 (merging.md §3)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True
    throughput: ClassVar[float] = 60e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.6

    def stat_scratch_tensors(self, key: str, num_models: int, params: Params) -> float:
        if key == THRESHOLDS:
            return 2.6  # one dropped task vector observed while the next is drawn
        return num_models + 0.6  # MAJORITY (the sign election over dropped task vectors)

    def stat_passes(self, key: str, words: int) -> int:
        return words if key == THRESHOLDS else 1  # a radix selection: one pass per word

    def global_stats(self, params: Params, model_params: list[ModelParams]) -> list[GlobalStat]:
        stats: list[GlobalStat] = []
        if params.density < 1 and params.scope == "global":
            stats.append(MagnitudeThresholds([params.density] * len(model_params), _dropped))
        if params.consensus == "ties" and params.zero_sign == "majority":
            stats.append(MajoritySign(dropped_chunks))
        return stats

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        weights = [mp.weight for mp in model_params]
        total = sum(weights)
        divide = params.consensus is None and params.combine == "mean" and abs(total) >= 1e-8
        ties = params.consensus == "ties"
        zero = ctx.stats[MAJORITY] if ties and params.zero_sign == "majority" else 1.0
        out, b = tensors[0].reshape(-1), base.reshape(-1)
        for s, wd in dropped_chunks(base, tensors, ctx):
            if ties:
                mixed = disjoint_merge(wd, elect_sign(wd, zero), weights, params.combine)
            else:
                mixed = wd[0].clone()
                for d in wd[1:]:
                    mixed += d
                if divide:
                    mixed /= total
            out[s] = mixed.mul_(params.lambda_).add_(b[s])
        return tensors[0]
