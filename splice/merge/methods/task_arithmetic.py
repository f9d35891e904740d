"""Task Arithmetic: add the scaled sum of task vectors to the base (merging.md §1).

θ = θ₀ + λ·Σ_t w_t (θ_t − θ₀); with ``normalize`` the sum is divided by Σ_t w_t (mergekit).
The paper's "sum" form with λ≈0.3 and the "mean" form (λ_mean = T·λ_sum) are the same family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._sparsify import chunk_slices
from splice.merge.methods._vectors import weighted_sum

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["TaskArithmetic"]


class Params(HyperParams):
    lambda_: float = Field(1.0, alias="lambda", description="λ: scale of the summed task vector")
    normalize: bool = Field(False, description="divide the sum by the sum of the weights")


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="w_t: this task vector's weight")


@methods.register("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """θ₀ + λ·Σ w_t τ_t (Ilharco et al., ICLR 2023)."""

    name: ClassVar[str] = "task_arithmetic"
    pretty_name: ClassVar[str] = "Task Arithmetic"
    reference: ClassVar[str] = "https://arxiv.org/abs/2212.04089 (merging.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    delta_only: ClassVar[bool] = True
    linear: ClassVar[bool] = True
    throughput: ClassVar[float] = 160e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0

    def coefficients(self, params: Params, model_params: list[ModelParams]) -> list[float]:
        weights = [mp.weight for mp in model_params]
        total = sum(weights)
        scale = (
            params.lambda_ / total if params.normalize and abs(total) >= 1e-8 else params.lambda_
        )
        return [scale * w for w in weights]

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
        scale = params.lambda_ / total if params.normalize and abs(total) >= 1e-8 else None
        flat, b = [t.reshape(-1) for t in tensors], base.reshape(-1)
        for s in chunk_slices(b.numel()):
            acc = weighted_sum((t[s] - b[s] for t in flat), weights)
            if scale is None:
                acc.mul_(params.lambda_)
            else:
                acc.mul_(scale)
            flat[0][s] = acc.add_(b[s])
        return tensors[0]
