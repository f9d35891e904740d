"""DARE: drop and rescale task vectors, then combine them (Yu et al., ICML 2024; merging.md §3).

Each entry of τ_t = θ_t − θ₀ is dropped with probability ``p`` and the survivors rescaled by
1/(1−p), so E[τ̃_t] = τ_t; the masks come from a per-tensor RNG seeded by (seed, tensor name).
Then ``consensus: null`` sums the weighted τ̃_t like Task Arithmetic (mergekit ``dare_linear``)
and ``consensus: ties`` elects signs and merges disjointly like TIES without its trim
(mergekit ``dare_ties``); θ = θ₀ + λ·τ_m. ``rescale: l1`` matches mergekit's dare (survivors
scaled to keep ‖τ_t‖₁), ``off`` is the paper's DropOnly ablation.
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
)
from splice.merge.methods.ties import MAJORITY, MajoritySign

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


def dropped_chunks(
    base: Tensor, tensors: list[Tensor], ctx: MergeContext, inplace: bool = True
) -> Iterator[tuple[slice, list[Tensor]]]:
    """``(slice, [w_t·DARE(τ_t)])`` chunk by chunk; ``inplace`` turns ``tensors`` into τ̃_t.

    One generator per tensor name draws the masks model after model, so the stat pass and
    the merge pass see the same drops.
    """
    params, model_params = ctx.params, ctx.model_params
    assert isinstance(params, Params) and model_params is not None
    gen = ctx.generator()
    deltas = []
    for t, mp in zip(tensors, model_params, strict=True):
        d = t.sub_(base) if inplace else t - base
        deltas.append(dare_drop_(d, mp.p, gen, params.rescale).mul_(mp.weight).reshape(-1))
    for s in chunk_slices(deltas[0].numel()):
        yield s, [d[s] for d in deltas]


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
        return num_models + 0.6  # MAJORITY (the sign election over dropped task vectors)

    def global_stats(self, params: Params, model_params: list[ModelParams]) -> list[GlobalStat]:
        if params.consensus == "ties" and params.zero_sign == "majority":
            return [MajoritySign(dropped_chunks)]
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
