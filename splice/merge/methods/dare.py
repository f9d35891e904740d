"""DARE: drop and rescale task vectors, then combine them (Yu et al., ICML 2024; merging.md §3).

Each entry of τ_t = θ_t − θ₀ is dropped with probability ``p`` and the survivors rescaled by
1/(1−p), so E[τ̃_t] = τ_t; the masks come from a per-tensor RNG seeded by (seed, tensor name).
Then ``consensus: null`` sums the weighted τ̃_t like Task Arithmetic (mergekit ``dare_linear``)
and ``consensus: ties`` elects signs and merges disjointly like TIES without its trim
(mergekit ``dare_ties``); θ = θ₀ + λ·τ_m. ``rescale: l1`` matches mergekit's dare (survivors
scaled to keep ‖τ_t‖₁), ``off`` is the paper's DropOnly ablation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from torch import Tensor

from splice.merge.base import GlobalStat, HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._sparsify import Aggregate, Rescale, dare_drop, disjoint_merge, elect_sign
from splice.merge.methods.task_arithmetic import weighted_deltas_
from splice.merge.methods.ties import MAJORITY, MajoritySign

__all__ = ["Dare"]


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

    @model_validator(mode="after")
    def _max_needs_ties(self) -> Params:
        if self.aggregate == "max" and self.consensus is None:
            raise ValueError("aggregate: max needs consensus: ties")
        return self

    @property
    def combine(self) -> Aggregate:
        return self.aggregate or ("sum" if self.consensus is None else "mean")


class ModelParams(HyperParams):
    p: float = Field(ge=0, le=1, description="drop rate: probability of dropping each entry")
    weight: float = Field(1.0, description="w_t: this task vector's weight")


def _dropped(base: Tensor, tensors: list[Tensor], ctx: MergeContext) -> list[Tensor]:
    """w_t·DARE(τ_t), in place in ``tensors``; one generator per tensor name, models in order."""
    params, model_params = ctx.params, ctx.model_params
    assert isinstance(params, Params) and model_params is not None
    gen = ctx.generator()
    deltas = weighted_deltas_(base, tensors, [1.0] * len(tensors))
    for d, mp in zip(deltas, model_params, strict=True):
        dare_drop(d, mp.p, gen, params.rescale).mul_(mp.weight)
    return deltas


@methods.register("dare")
class Dare(MergeMethod):
    """DARE drop-and-rescale, then a weighted sum or TIES consensus (see module docstring)."""

    name: ClassVar[str] = "dare"
    pretty_name: ClassVar[str] = "DARE"
    reference: ClassVar[str] = "https://arxiv.org/abs/2311.03099 (merging.md §3)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams

    def global_stats(self, params: Params, model_params: list[ModelParams]) -> list[GlobalStat]:
        if params.consensus == "ties" and params.zero_sign == "majority":
            return [MajoritySign(_dropped)]
        return []

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        deltas = _dropped(base, tensors, ctx)
        weights = [mp.weight for mp in model_params]
        if params.consensus == "ties":
            zero = ctx.stats[MAJORITY] if params.zero_sign == "majority" else 1.0
            sign = elect_sign(deltas, zero)
            out = disjoint_merge(deltas, sign, weights, params.combine, out=deltas[0])
        else:
            out = deltas[0]
            for d in deltas[1:]:
                out.add_(d)
            total = sum(weights)
            if params.combine == "mean" and abs(total) >= 1e-8:
                out.div_(total)
        return out.mul_(params.lambda_).add_(base)
