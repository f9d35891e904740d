"""NuSLERP: spherical interpolation of two models, optionally of their task vectors, whole
tensors or row by row (mergekit's ``nuslerp``).

With weights w_1, w_2: t = w_2 / (w_1 + w_2) (0.5 if the sum is below 1e-6). Vectors v_1,
v_2 are the two models, or with a base their task vectors θ_i − θ₀ (then θ₀ is added back).
``nuslerp_flatten`` (default) treats each tensor as one vector; otherwise every vector along
the last axis (``nuslerp_row_wise``: along the first) is interpolated on its own.
cos Ω = v̂_1·v̂_2 (norms floored at 1e-7), slerp = (sin((1 − t)Ω)·v_1 + sin(tΩ)·v_2)/sin Ω,
and plain (1 − t)·v_1 + t·v_2 where 1 − cos²Ω ≤ 1e-16. Unlike ``slerp`` neither input needs
to be the base. There is no paper: both dialects are mergekit's. The flattened case takes
its angle from a float64 Gram pass (results agree with mergekit to rounding).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._vectors import gram, linear_combination_

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["NuSlerp", "slerp_rows_"]

EPS = 1e-8


class Params(HyperParams):
    nuslerp_flatten: bool = Field(True, description="one angle per tensor (else per vector)")
    nuslerp_row_wise: bool = Field(False, description="unflattened: vectors along axis 0")


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="this model's weight (t = w_2 / (w_1 + w_2))")


def _factors(cos: float, t: float) -> tuple[float, float]:
    if 1 - cos * cos <= EPS**2:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _slerp_vectors(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Slerp of each pair of vectors along the last axis of ``a`` and ``b`` (mergekit's op
    order)."""
    au = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    bu = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (au * bu).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del au, bu
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * a + t * b, out)


def slerp_rows_(t: float, v0: Tensor, v1: Tensor, dim: int) -> Tensor:
    """Slerp of every vector along ``dim`` of ``v0`` and ``v1`` (mergekit's unflattened mode),
    written into ``v0`` a block of vectors at a time."""
    if dim != -1 and v0.dim() != 2:  # no 2-D view of the vectors: the whole tensor at once
        out = _slerp_vectors(t, v0.transpose(dim, -1), v1.transpose(dim, -1))
        return v0.copy_(out.transpose(dim, -1))
    if dim == -1:
        a, b = v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1])
    else:
        a, b = v0.t(), v1.t()
    step = max(1, (1 << 16) // a.shape[1])
    for r in range(0, a.shape[0], step):
        a[r : r + step] = _slerp_vectors(t, a[r : r + step], b[r : r + step])
    return v0


@methods.register("nuslerp")
class NuSlerp(MergeMethod):
    """Slerp of two models (or task vectors) with t from their weights."""

    name: ClassVar[str] = "nuslerp"
    pretty_name: ClassVar[str] = "NuSLERP"
    reference: ClassVar[str] = "mergekit-notes.md §1"
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    requires_base: ClassVar[bool] = False
    num_models: ClassVar[tuple[int, int | None]] = (2, 2)
    throughput: ClassVar[float] = 80e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.1

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        w1, w2 = (mp.weight for mp in model_params)
        t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
        if not params.nuslerp_flatten and tensors[0].dim() > 0:
            v0, v1 = (x if base is None else x.sub_(base) for x in tensors)
            out = slerp_rows_(t, v0, v1, 0 if params.nuslerp_row_wise else -1)
            return out if base is None else out.add_(base)
        g = gram(tensors, base)[0]
        n0, n1 = (max(math.sqrt(float(g[i, i])), 1e-7) for i in (0, 1))
        cos = min(1.0, max(-1.0, float(g[0, 1]) / (n0 * n1)))
        return linear_combination_(base, tensors, list(_factors(cos, t)))
