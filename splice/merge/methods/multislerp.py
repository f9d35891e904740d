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
tests/merge/methods/test_spherical.py). ``mergekit_norms`` (set by mergekit recipes) takes
the norms as mergekit does, whole-vector float32 ``torch.norm`` — the only place its floats
leave the formula — and so lands on mergekit's output to float32 rounding (one input's
vector and the mean as scratch, not mergekit's 3N stacked copies).
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
    mergekit_norms: bool = Field(
        False,
        description="take ‖v_i‖ and ‖Σ w_i u_i‖ with torch's float32 whole-vector norm, as "
        "mergekit does (it is off by ~2e-3 relative on 30M entries): mergekit's output to "
        "float32 rounding (mergekit recipes set it)",
    )


class ModelParams(HyperParams):
    weight: float = Field(1.0, description="this model's weight")


def _coefficients(
    g: Tensor, w: Tensor, eps: float, where: str, mergekit: tuple[Tensor, float] | None = None
) -> Tensor:
    """The result's coefficients on the inputs' vectors, from their Gram matrix ``g``;
    ``mergekit`` gives the input norms and ‖Σ w_i u_i‖ as mergekit takes them instead."""
    norms = g.diagonal().sqrt() if mergekit is None else mergekit[0]
    if float(w @ norms) == 0:  # every input is zero (a tensor no fine-tune changed)
        return torch.zeros_like(w)
    c = w / (norms + eps)  # Σ c_i v_i = Σ w_i u_i
    mean_norm = float(c @ g @ c).__abs__() ** 0.5 if mergekit is None else mergekit[1]
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


def _mergekit_norms(
    base: Tensor | None, tensors: list[Tensor], w: Tensor, eps: float
) -> tuple[Tensor, float]:
    """‖v_i‖ and ‖Σ w_i v_i/(‖v_i‖ + ε)‖ with ``torch.norm`` on whole float32 vectors, as
    mergekit takes them. torch's CPU kernel loses accuracy with length (2e-3 relative at 33M
    entries) while its ``sum`` does not, so these norms are where mergekit's output departs
    from the formula (its norm of the tangent sum too, but that only enters cos and sin of a
    ~1e-3 angle); its other reductions agree with the Gram matrix's to float32 rounding.
    Scratch: one vector and the mean."""
    flat_base = None if base is None else base.reshape(-1)
    buf = None if base is None else torch.empty_like(flat_base)  # one v_i at a time

    def vector(t: Tensor) -> Tensor:
        t = t.reshape(-1)
        return t if flat_base is None else torch.sub(t, flat_base, out=buf)

    norms = torch.tensor([float(torch.norm(vector(t))) for t in tensors], dtype=torch.float64)
    c = (w / (norms + eps)).tolist()
    mean = torch.zeros(tensors[0].numel(), dtype=tensors[0].dtype)
    for t, ci in zip(tensors, c, strict=True):
        mean.add_(vector(t), alpha=ci)
    return norms, float(torch.norm(mean))


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
        norms = isinstance(params, Params) and params.mergekit_norms
        return 2.1 if norms else 0.1  # mergekit's norms: one input's vector and the mean

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
        w = torch.tensor([mp.weight for mp in model_params], dtype=torch.float64)
        if params.normalize_weights:
            w = w / w.sum()
        mk = _mergekit_norms(base, tensors, w, params.eps) if params.mergekit_norms else None
        coefs = _coefficients(gram(tensors, base)[0], w, params.eps, ctx.name, mk)
        return linear_combination_(base, tensors, coefs.tolist())
