"""Passthrough: the one input's tensor as it is, optionally scaled (mergekit's ``passthrough``).

With ``slices:`` it stacks layers of several models into one ("frankenmerges",
:mod:`splice.merge.engine.slices`); ``scale`` (often a filter list such as
``[{filter: o_proj, value: 0}, {value: 1}]``) multiplies the tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice.merge.base import HyperParams, MergeContext, MergeMethod, NoParams, methods

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Passthrough"]


class ModelParams(HyperParams):
    scale: float | None = Field(None, description="multiply the tensor by this (none: as is)")


@methods.register("passthrough")
class Passthrough(MergeMethod):
    """One input per tensor, copied (and scaled); the building block of layer stacking."""

    name: ClassVar[str] = "passthrough"
    pretty_name: ClassVar[str] = "Passthrough"
    reference: ClassVar[str] = "mergekit passthrough (mergekit-notes.md §2.1)"
    Params: ClassVar[type[HyperParams]] = NoParams
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    requires_base: ClassVar[bool] = False
    num_models: ClassVar[tuple[int, int | None]] = (1, 1)
    throughput: ClassVar[float] = 400e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: HyperParams,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        scale = model_params[0].scale  # type: ignore[attr-defined]
        return tensors[0] if scale is None else tensors[0].mul_(scale)
