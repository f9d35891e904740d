"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023; merging.md §2).

For task vectors τ_t = θ_t − θ₀: keep the ``density`` fraction of largest |τ_t| (trim),
elect a sign per entry from Σ_t w_t τ̂_t, average the entries that agree with it (disjoint
mean; ``sum``/``max`` are the code's other aggregations), then θ = θ₀ + λ·τ_m.

``scope: global`` (the paper, and the default of native recipes) trims each task vector
against one threshold over the whole model, computed exactly by streaming radix selection
before the merge pass; ``scope: tensor`` trims every tensor separately (mergekit's ``ties``).
``zero_sign: majority`` gives entries whose elected sum is exactly 0 the model-wide majority
sign (official code); ``positive`` gives them + (mergekit). Trim keeps exactly
⌊density·n⌋ entries (ties at the threshold kept); the official code keeps one more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

from pydantic import Field

from splice._lazy import lazy_import
from splice.errors import SpliceError
from splice.merge.base import GlobalStat, HyperParams, MergeContext, MergeMethod, methods
from splice.merge.engine.stats import RadixSelect
from splice.merge.methods._sparsify import (
    Aggregate,
    chunk_slices,
    disjoint_merge,
    elect_sign,
    keep_count,
    magnitude_thresholds,
    trim,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["MagnitudeThresholds", "MajoritySign", "Ties", "trim_thresholds", "trimmed_chunks"]

THRESHOLDS = "ties.thresholds"
MAJORITY = "ties.majority_sign"


class Params(HyperParams):
    lambda_: float = Field(1.0, alias="lambda", description="λ: scale of the merged task vector")
    scope: Literal["global", "tensor"] = Field(
        "global", description="trim threshold over the whole model (paper) or per tensor"
    )
    aggregate: Aggregate = Field(
        "mean", description="disjoint mean (paper), sum, or max of the agreeing entries"
    )
    zero_sign: Literal["majority", "positive"] = Field(
        "majority", description="sign where the elected sum is 0: model-wide majority or +"
    )


class ModelParams(HyperParams):
    density: float = Field(0.2, ge=0, le=1, description="k: fraction of |τ| kept by the trim")
    weight: float = Field(1.0, description="w_t: this task vector's weight")


class Thresholds(NamedTuple):
    values: list[float]
    densities: list[float]


def _task_vectors(base: Tensor, tensors: list[Tensor], ctx: MergeContext) -> Iterator[Tensor]:
    return (t - base for t in tensors)


class MagnitudeThresholds:
    """Per-model global trim threshold: the ⌊d_t·P⌋-th largest |τ_t| over all P entries.

    ``deltas(base, tensors, ctx)`` yields the vectors to trim, model after model, without
    modifying the inputs (default τ_t = θ_t − θ₀; DARE passes its dropped τ̃_t).
    """

    key = THRESHOLDS

    def __init__(
        self,
        densities: list[float],
        deltas: Callable[[Tensor, list[Tensor], MergeContext], Iterator[Tensor]] = _task_vectors,
    ) -> None:
        self.densities = densities
        self.deltas = deltas
        self._selects: list[RadixSelect | None] | None = None

    def observe(
        self, name: str, base: Tensor | None, tensors: list[Tensor], ctx: MergeContext
    ) -> None:
        assert base is not None
        if self._selects is None:
            self._selects = [
                RadixSelect(lambda n, d=d: n - keep_count(d, n) + 1, base.dtype, magnitude=True)
                if 0 < d < 1
                else None
                for d in self.densities
            ]
        if all(sel is None for sel in self._selects):
            return
        deltas = self.deltas(base, tensors, ctx)
        for sel in self._selects:  # not zip: its reused tuple would keep the last delta alive
            delta = next(deltas)
            if sel is not None:
                sel.observe(delta)
            del delta  # before the next one is computed

    def end_pass(self) -> bool:
        if self._selects is None:
            return True
        return all([s.end_pass() for s in self._selects if s is not None])

    def result(self) -> Thresholds:
        selects = self._selects or [None] * len(self.densities)
        values = [
            sel.value if sel is not None else (0.0 if d >= 1 else float("inf"))
            for d, sel in zip(self.densities, selects, strict=True)
        ]
        return Thresholds(values, self.densities)


class MajoritySign:
    """sign(Σ_j γ_j) over the whole model, γ the elected signs (the code's zero-sign rule).

    ``weighted(base, tensors, ctx, inplace=False)`` yields ``(slice, [w_t·δ_t chunk])`` for
    one tensor name without modifying its inputs. A zero total counts as + [lib].
    """

    key = MAJORITY

    def __init__(self, weighted: Callable[..., Iterator[tuple[slice, list[Tensor]]]]) -> None:
        self.weighted = weighted
        self.total = 0

    def observe(
        self, name: str, base: Tensor | None, tensors: list[Tensor], ctx: MergeContext
    ) -> None:
        for _, wd in self.weighted(base, tensors, ctx, inplace=False):
            self.total += int(elect_sign(wd, zero_sign=0).sum(dtype=torch.float64))

    def end_pass(self) -> bool:
        return True

    def result(self) -> float:
        return 1.0 if self.total >= 0 else -1.0


def _zero_sign(params: HyperParams, ctx: MergeContext) -> float:
    return ctx.stats[MAJORITY] if getattr(params, "zero_sign", None) == "majority" else 1.0


def trim_thresholds(
    deltas: list[Tensor], densities: list[float], scope: str, ctx: MergeContext, what: str
) -> list[float]:
    """Each delta's trim threshold: its own top-``density`` magnitude (``scope: tensor``) or
    the model-wide one of :class:`MagnitudeThresholds` (``global``; ``what`` names the
    parameter that must then be one value per model)."""
    if scope == "tensor":
        return magnitude_thresholds(deltas, densities)
    thresholds, model_wide = ctx.stats[THRESHOLDS]
    for here, d in zip(densities, model_wide, strict=True):
        if here != d:
            raise SpliceError(
                f"{what} {here} here differs from the model-wide {d}",
                where=ctx.name,
                fix=f"with scope: global, {what} is one value per model; "
                f"use scope: tensor for per-layer values",
            )
    return thresholds


def trimmed_chunks(
    base: Tensor, tensors: list[Tensor], ctx: MergeContext, inplace: bool = True
) -> Iterator[tuple[slice, list[Tensor]]]:
    """``(slice, [w_t·trim(τ_t)])`` chunk by chunk; ``inplace`` turns ``tensors`` into τ_t."""
    params, model_params = ctx.params, ctx.model_params
    assert isinstance(params, Params) and model_params is not None
    if inplace:
        deltas = [t.sub_(base).reshape(-1) for t in tensors]
    elif params.scope == "tensor":
        deltas = [(t - base).reshape(-1) for t in tensors]
    else:
        deltas = [t.reshape(-1) for t in tensors]
    densities = [mp.density for mp in model_params]
    thresholds = trim_thresholds(deltas, densities, params.scope, ctx, "density")
    raw = not inplace and params.scope == "global"
    b = base.reshape(-1)
    for s in chunk_slices(b.numel()):
        yield (
            s,
            [
                trim(d[s] - b[s] if raw else d[s], thr) * mp.weight
                for d, thr, mp in zip(deltas, thresholds, model_params, strict=True)
            ],
        )


@methods.register("ties")
class Ties(MergeMethod):
    """TIES-Merging: trim × elect × disjoint mean × λ (see module docstring)."""

    name: ClassVar[str] = "ties"
    pretty_name: ClassVar[str] = "TIES-Merging"
    reference: ClassVar[str] = "https://arxiv.org/abs/2306.01708 (merging.md §2)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True
    throughput: ClassVar[float] = 90e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.3

    def stat_scratch_tensors(self, key: str, num_models: int, params: Params) -> float:
        if key == THRESHOLDS:
            return 1
        return num_models if params.scope == "tensor" else 0.3  # MAJORITY

    def stat_passes(self, key: str, words: int) -> int:
        return words if key == THRESHOLDS else 1  # a radix selection: one pass per word

    def global_stats(self, params: Params, model_params: list[ModelParams]) -> list[GlobalStat]:
        stats: list[GlobalStat] = []
        if params.scope == "global":
            stats.append(MagnitudeThresholds([mp.density for mp in model_params]))
        if params.zero_sign == "majority":
            stats.append(MajoritySign(trimmed_chunks))
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
        zero, weights = _zero_sign(params, ctx), [mp.weight for mp in model_params]
        out, b = tensors[0].reshape(-1), base.reshape(-1)
        for s, wd in trimmed_chunks(base, tensors, ctx):
            mixed = disjoint_merge(wd, elect_sign(wd, zero), weights, params.aggregate)
            out[s] = mixed.mul_(params.lambda_).add_(b[s])
        return tensors[0]
