"""Multi-SLERP: barycentric interpolation of N tensors on the hypersphere (Goddard, 2025;
mergekit's ``multislerp``).

Each input (a task vector θ_i − θ₀ when a base is given) is flattened and normalised,
u_i = v_i / (‖v_i‖ + ε); with weights w (divided by their sum under
``normalize_weights``) the mean direction μ = Σ w_i u_i / ‖Σ w_i u_i‖; the units are projected
to the tangent space at μ, u_i − (u_i·μ)μ, and their weighted sum τ is mapped back,
μ cos‖τ‖ + τ sin‖τ‖/‖τ‖ (‖τ‖ + ε in both places), then scaled by Σ w_i ‖v_i‖ (and the base
added). A single input is returned as is. If the weighted units cancel (‖Σ w_i u_i‖ < ε),
two inputs fall back to Σ w_i v_i and more are an error — except when every input is zero
(a tensor no fine-tune changed): then the result is 0 (the base), where mergekit raises.
There is no paper: both dialects are mergekit's. Every vector in this chain is a combination
Σ c_i v_i, so splice computes the inputs' Gram matrix in one streaming pass (float32
chunks, float64 sums) and the result in a second, without mergekit's stacked copies: on the
168M benchmark the two tools differ by up to 1.4e-4, which is mergekit's error: its float32
``torch.norm`` loses 2e-3 relative on the 32.8M-entry embedding (its formula with exact norms
lands where splice does, within output rounding of the float64 formula;
tests/merge/methods/test_spherical.py). ``mergekit_exact`` (set by mergekit recipes)
reproduces mergekit's floats instead, bit for bit: its arithmetic in the inputs' dtype, whole-
tensor ``torch.norm`` and dot-product reductions included, one input at a time rather than
stacked (scratch: three tensors of the output's size, not 3N).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from splice._lazy import lazy_import
from splice.errors import SpliceError
from splice.merge.base import HyperParams, MergeContext, MergeMethod, methods
from splice.merge.methods._vectors import gram, linear_combination_

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())

__all__ = ["MultiSlerp"]


class Params(HyperParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="ε added to norms")
    mergekit_exact: bool = Field(
        False,
        description="mergekit's floats bit for bit: its arithmetic in the inputs' dtype, with "
        "float32 whole-tensor norms (off by ~2e-3 relative on 30M entries; mergekit "
        "recipes set it)",
    )


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="this model's weight")


def _coefficients(g: Tensor, w: Tensor, eps: float, where: str) -> Tensor:
    norms = g.diagonal().sqrt()
    if float(w @ norms) == 0:  # every input is zero (a tensor no fine-tune changed)
        return torch.zeros_like(w)
    c = w / (norms + eps)  # Σ c_i v_i = Σ w_i u_i
    mean_norm = float(c @ g @ c).__abs__() ** 0.5
    if mean_norm < eps:
        if len(w) == 2:
            return w
        raise SpliceError(
            "the weighted unit vectors cancel out (antipodal inputs with balancing weights)",
            where=where,
            fix="use different weights for these models",
        )
    m = c / mean_norm  # μ = Σ m_i v_i
    dots = (g @ m) / (norms + eps)
    a = c - float(w @ dots) * m  # the tangent sum τ = Σ a_i v_i
    tn = float(a @ g @ a).__abs__() ** 0.5 + eps
    return float(w @ norms) * (m * math.cos(tn) + a * (math.sin(tn) / tn))


def _mergekit_floats(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], params: Params, where: str
) -> Tensor:
    """mergekit's ``multislerp`` as it computes it: every step in the inputs' dtype, the same
    reductions (``torch.norm`` of a whole vector, ``sum`` of a whole product), so the same
    bits. Each input's vector and unit vector are recomputed where mergekit reads its stacked
    copies (the same operations give the same floats)."""
    dtype, eps = tensors[0].dtype, params.eps
    w = torch.tensor(weights, dtype=dtype)
    if params.normalize_weights:
        w = w / w.sum()
    flat_base = None if base is None else base.reshape(-1)

    def vector(i: int) -> Tensor:
        t = tensors[i].reshape(-1)
        return t if flat_base is None else t - flat_base

    norms = torch.stack([torch.norm(vector(i)) for i in range(len(tensors))])
    if float((norms * w).sum()) == 0:  # every input is zero: the base, where mergekit raises
        return tensors[0].new_zeros(tensors[0].shape) if base is None else base.clone()

    def unit(i: int) -> Tensor:
        return vector(i) / (norms[i] + eps)

    mean = (unit(0) * w[0]).add_(unit(1) * w[1])  # sum(0) of the stacked rows, in order
    for i in range(2, len(tensors)):
        mean.add_(unit(i) * w[i])
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) > 2:
            raise SpliceError(
                "the weighted unit vectors cancel out (antipodal inputs with balancing weights)",
                where=where,
                fix="use different weights for these models",
            )
        res = vector(0) * w[0] + vector(1) * w[1]
    else:
        mean = mean / mean_norm
        tangent = torch.zeros_like(mean)
        for i in range(len(tensors)):
            u = unit(i)
            tangent.add_(u.sub_((u * mean).sum() * mean).mul_(w[i]))
            del u
        tn = torch.norm(tangent) + eps
        res = mean.mul_(torch.cos(tn)).add_(tangent.mul_(torch.sin(tn) / tn))
        res.mul_((norms * w).sum())
    return (res if flat_base is None else res.add_(flat_base)).view_as(tensors[0])


@methods.register("multislerp")
class MultiSlerp(MergeMethod):
    """Weighted spherical barycentre of the inputs (or of their task vectors)."""

    name: ClassVar[str] = "multislerp"
    pretty_name: ClassVar[str] = "Multi-SLERP"
    reference: ClassVar[str] = (
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (mergekit-notes.md §1)"
    )
    Params: ClassVar[type[HyperParams]] = Params
    ModelParams: ClassVar[type[HyperParams]] = ModelParams
    requires_base: ClassVar[bool] = False
    throughput: ClassVar[float] = 80e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.1

    def scratch_for(self, num_models: int, params: HyperParams) -> float:
        exact = isinstance(params, Params) and params.mergekit_exact
        return 5.0 if exact else 0.1  # mergekit's floats: mean, tangent, a unit, products

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[ModelParams],
        ctx: MergeContext,
    ) -> Tensor:
        if len(tensors) == 1:
            return tensors[0]
        if params.mergekit_exact:
            weights = [mp.weight for mp in model_params]
            return _mergekit_floats(base, tensors, weights, params, ctx.name)
        w = torch.tensor([mp.weight for mp in model_params], dtype=torch.float64)
        if params.normalize_weights:
            w = w / w.sum()
        coefs = _coefficients(gram(tensors, base)[0], w, params.eps, ctx.name)
        return linear_combination_(base, tensors, coefs.tolist())
