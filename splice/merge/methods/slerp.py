"""SLERP: spherical interpolation between the base and one other model, per tensor.

Each tensor is flattened; Ω is the angle between the two unit vectors and
θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ_other, falling back to linear interpolation
when |cos Ω| > 0.9995 (nearly (anti)parallel), as mergekit's ``slerp`` does. ``t`` = 0 gives
the base, 1 the other model; it may vary with depth and tensor name (gradients, filters).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["Slerp", "slerp"]

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class Params(HyperParams):
    t: float = Field(0.5, description="interpolation factor: 0 = base, 1 = the other model")


def slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Spherical interpolation of two same-shaped tensors, treated as flat vectors."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    na, nb = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    dot = float(torch.dot(x, y)) / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


@methods.register("slerp")
class Slerp(MergeMethod):
    """Spherical linear interpolation from the base (t=0) to one other model (t=1)."""

    name: ClassVar[str] = "slerp"
    pretty_name: ClassVar[str] = "SLERP"
    reference: ClassVar[str] = "https://en.wikipedia.org/wiki/Slerp (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    num_models: ClassVar[tuple[int, int | None]] = (1, 1)

    def scratch_tensors(self, num_models: int) -> float:
        return 3

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        assert base is not None
        return slerp(params.t, base, tensors[0])
