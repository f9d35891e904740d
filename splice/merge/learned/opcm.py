"""OPCM: orthogonal-projection continual merging (Tang et al., arXiv 2501.09522).

merging.md §10 (FusionBench ``OPCM`` semantics). Models arrive one at a time; the first is
kept as is. For every later task vector τ_t:

1. each linear weight's τ_t is projected away from the current merged update Δ = W − W₀:
   with ``Δ = UΣVᵀ`` (full SVD) and ``r`` the first index where ``cumsum(σ)/Σσ > alpha``,
   ``P = UᵀτV``, then ``P_ii = 0`` for every i and ``P[:r, :r] = 0``, and ``τ̃ = UPVᵀ``
   (an all-zero Δ leaves τ unprojected, the spec's guard); other tensors (biases, norms,
   embeddings, an attention's packed ``in_proj_weight``) add τ_t as is — FusionBench projects
   ``nn.Linear`` weights only, also when the base is a plain state dict (merging.md Errata);
2. the running sum is ``λ_{t−1}Δ + τ̃_t`` and is rescaled to the mean task-vector norm
   ``n̄_t`` (global L2 over all tensors): ``λ_t = ‖sum‖/n̄_t``, ``Δ ← sum/λ_t``.

So ``‖θ^(t) − θ₀‖ = n̄_t`` after every step, and ``λ_t ≈ √t`` for orthogonal task vectors.
Data-free; memory holds the base, the merged update and one incoming task vector.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.merge.base import HyperParams
from splice.merge.learned._base import ContinualStep, LearnedMethod, learned
from splice.merge.learned._continual import base_state, global_norm, linear_weights, sequence

__all__ = ["Params", "opcm", "project"]


class Params(HyperParams):
    alpha: float = Field(0.5, ge=0, le=1, description="energy threshold of the kept block")


def project(merged: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """τ̃: τ with its components on Δ's diagonal singular pairs and top-r block removed."""
    if not bool(merged.any()):
        return tau
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    ratio = s.cumsum(0) / s.sum()
    r = int((ratio > alpha).to(torch.int8).argmax())
    p = u.T @ tau @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0
    return u @ p @ vh


def opcm(
    module: nn.Module | Mapping[str, Tensor],
    deltas: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
    *,
    alpha: float = 0.5,
    projected: Collection[str] | None = None,
    device: str | torch.device | None = None,
) -> Iterator[ContinualStep]:
    """Merge ``deltas`` (in order) continually; yield the merged model after each task.

    ``module`` is the base ``nn.Module`` (its ``nn.Linear`` weights are projected) or a state
    dict (its ``….weight`` 2-D tensors outside embedding tables are: the rule of
    :func:`~splice.merge.learned._continual.linear_weights`); every other tensor is added
    unprojected, then rescaled with the rest. ``projected`` overrides which names are. Each step's
    ``weights`` hold base + merged ΔW for every name seen so far (CPU, base dtype);
    ``info["scale"]`` is λ_t and ``info["mean_norm"]`` n̄_t.
    """
    base, _ = base_state(module, device)
    proj = set(projected) if projected is not None else linear_weights(module)
    merged: dict[str, Tensor] = {}  # Δ: the scaled merged update
    norms: list[float] = []
    lam = 1.0
    for index, (task, tau) in enumerate(sequence(deltas, base)):
        start = time.perf_counter()
        norms.append(global_norm(tau.values()))
        mean_norm = sum(norms) / len(norms)
        if index == 0:
            merged = {n: t.clone() for n, t in tau.items()}
        else:
            total: dict[str, Tensor] = {}
            for n in merged.keys() | tau.keys():
                prev = merged.get(n)
                new = tau.get(n)
                if new is not None and prev is not None and n in proj and new.dim() == 2:
                    new = project(prev, new, alpha)
                total[n] = (lam * prev if prev is not None else 0) + (new if new is not None else 0)
            u = global_norm(total.values())
            lam = u / mean_norm if mean_norm > 0 else 1.0
            merged = {n: t / lam for n, t in total.items()}
        weights = {n: (base[n] + merged[n]).to("cpu", base[n].dtype) for n in merged}
        info = {
            "scale": lam,
            "mean_norm": mean_norm,
            "task_norm": norms[-1],
            "seconds": time.perf_counter() - start,
        }
        yield ContinualStep(task, index, weights, info)


learned.register("opcm")(
    LearnedMethod(
        name="opcm",
        pretty_name="OPCM",
        reference="https://arxiv.org/abs/2501.09522 (merging.md §10)",
        fn=opcm,
        Params=Params,
        data="none",
        continual=True,
    )
)
