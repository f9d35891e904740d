"""Karcher mean: the Riemannian (Fréchet) mean of the inputs' directions on the unit sphere,
rescaled by their mean norm (mergekit's ``karcher``; arXiv 2603.04972).

Each input is flattened; u_i = θ_i / ‖θ_i‖ for the inputs with ‖θ_i‖ > ``tol`` (equal
weights among them). Start from the normalised arithmetic mean of the u_i (u_0 if it
vanishes), then iterate at most ``max_iter`` times: tangent T = Σ_i a_i·θ_i/sin θ_i·
(u_i − cos θ_i·μ) over the inputs at angle θ_i = arccos(μ·u_i) ≥ ``tol``; stop when
‖T‖ < ``tol``, else μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖, renormalised. θ = (Σ_i ‖θ_i‖ / N)·μ over
all N inputs. Per-model weights are not used and there is no base: a mergekit recipe's
``base_model`` is one more input, as mergekit counts it. Every iterate is a combination of
the u_i, so splice iterates on coefficients with the inputs' Gram matrix (one streaming
pass, float64) and writes the result in a second pass; results agree to rounding.
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

__all__ = ["Karcher", "karcher_coefficients"]


class Params(HyperParams):
    max_iter: int = Field(10, ge=0, description="fixed-point iterations at most")
    tol: float = Field(1e-5, ge=0, description="norm/angle/step tolerance")


def _norm(beta: Tensor, u: Tensor) -> float:
    return math.sqrt(max(0.0, float(beta @ u @ beta)))


def karcher_coefficients(g: Tensor, max_iter: int, tol: float) -> Tensor:
    """``c`` with the Karcher-mean result = Σ c_i θ_i, from the inputs' Gram matrix ``g``."""
    n = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    inv = torch.where(norms > 0, 1 / norms.where(norms > 0, 1.0), 0.0)
    u = g * inv[:, None] * inv[None, :]  # Gram matrix of the unit vectors
    a = torch.zeros(n, dtype=torch.float64)
    a[valid] = 1.0 / len(valid)
    beta = a.clone()  # μ = Σ β_i u_i
    mn = _norm(beta, u)
    beta = (
        torch.nn.functional.one_hot(torch.tensor(valid[0]), n).double() if mn < tol else beta / mn
    )
    for _ in range(max_iter):
        dots = (u @ beta).clamp(-1, 1)
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            tangent += a[i] * theta / math.sin(theta) * (-float(dots[i]) * beta)
            tangent[i] += a[i] * theta / math.sin(theta)
        tn = _norm(tangent, u)
        if tn < tol:
            break
        beta = math.cos(tn) * beta + math.sin(tn) * tangent / tn
        un = _norm(beta, u)
        if un > tol:
            beta = beta / un
    return float(norms.sum()) / n * beta * inv


@methods.register("karcher")
class Karcher(MergeMethod):
    """Spherical (Karcher) mean of the inputs' directions times their mean norm."""

    name: ClassVar[str] = "karcher"
    pretty_name: ClassVar[str] = "Karcher Mean"
    reference: ClassVar[str] = "https://arxiv.org/abs/2603.04972 (mergekit-notes.md §1)"
    Params: ClassVar[type[HyperParams]] = Params
    requires_base: ClassVar[bool] = False
    throughput: ClassVar[float] = 80e6

    def scratch_tensors(self, num_models: int) -> float:
        return 0.1

    def merge(
        self,
        base: Tensor | None,
        tensors: list[Tensor],
        params: Params,
        model_params: list[HyperParams],
        ctx: MergeContext,
    ) -> Tensor:
        if len(tensors) == 1:
            return tensors[0]
        coefs = karcher_coefficients(gram(tensors)[0], params.max_iter, params.tol)
        return linear_combination_(None, tensors, coefs.tolist())
