"""NearSwap: take the other model's value only where it is already close to the base
(alchemonaut's QuartetAnemoi recipe; mergekit's ``nearswap``).

Element-wise, with θ₀ the base and θ₁ the one other model: ω = clamp(t / max(|θ₀ − θ₁|,
1e-6), 0, 1) and θ = ω·θ₁ + (1 − ω)·θ₀. Entries closer than ``t`` are swapped in whole;
farther ones move toward θ₁ by the fraction t/|θ₀ − θ₁|. There is no paper; both dialects
are mergekit's, computed in its order of operations chunk by chunk (the same floats).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._sparsify import chunk_slices

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["NearSwap"]


class Params(HyperParams):
    t: float = Field(description="distance below which the other model's value is taken")


@methods.register("nearswap")
class NearSwap(MergeMethod):
    """Per-entry interpolation weight t/|θ₀ − θ₁| (clamped to [0, 1]) toward the other model."""

    name: ClassVar[str] = "nearswap"
    pretty_name: ClassVar[str] = "NearSwap"
    reference: ClassVar[str] = (
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (mergekit-notes.md §1)"
    )
    Params: ClassVar[type[HyperParams]] = Params
    num_models: ClassVar[tuple[int, int | None]] = (1, 1)
    throughput: ClassVar[float] = 150e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        a, b = base.reshape(-1), tensors[0].reshape(-1)
        for s in chunk_slices(a.numel()):
            w = (params.t / (a[s] - b[s]).abs_().clamp_(min=1e-6)).clamp_(0, 1)
            b[s] = w * b[s] + (1 - w) * a[s]
        return tensors[0]
