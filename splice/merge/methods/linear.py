"""Linear merge: a weighted average of the inputs' weights (model soups).

θ = Σ_i w_i θ_i / Σ_i w_i, or the plain weighted sum with ``normalize: false`` (mergekit's
``linear``; Wortsman et al., ICML 2022).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._sparsify import chunk_slices
from splice.merge.methods._vectors import weighted_sum

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Linear"]


class Params(HyperParams):
    normalize: bool = Field(True, description="divide by the sum of the weights")


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="this model's weight")


@methods.register("linear")
class Linear(MergeMethod):
    """Weighted average of full weights; a base, if given, is not an input."""

    name: ClassVar[str] = "linear"
    pretty_name: ClassVar[str] = "Linear (model soup)"
    reference: ClassVar[str] = "https://arxiv.org/abs/2203.05482 (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    requires_base: ClassVar[bool] = False
    delta_only: ClassVar[bool] = True
    linear: ClassVar[bool] = True
    throughput: ClassVar[float] = 180e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0

    def coefficients(self, params: Params, model_params: list[ModelParams]) -> list[float]:
        weights = [mp.weight for mp in model_params]
        total = sum(weights)
        return [w / total for w in weights] if params.normalize else weights

    def check_adapter_output(
        self, params: Params, model_params: list[ModelParams], where: str
    ) -> None:
        total = sum(mp.weight for mp in model_params)
        if not params.normalize and abs(total - 1) > 1e-6:
            raise SpliceError(
                f"linear with normalize: false and weights summing to {total} scales the "
                "base too, which no adapter can express",
                where=where,
                fix="use normalize: true, weights summing to 1, or task_arithmetic",
            )

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        weights = [mp.weight for mp in model_params]
        total = sum(weights) if params.normalize else 1.0
        if total == 0:
            raise SpliceError("linear weights sum to 0", where=ctx.name, fix="use normalize: false")
        flat = [t.reshape(-1) for t in tensors]
        for s in chunk_slices(flat[0].numel()):
            acc = weighted_sum([flat[0][s].clone(), *(t[s] for t in flat[1:])], weights)
            flat[0][s] = acc.div_(total) if params.normalize else acc
        return tensors[0]
