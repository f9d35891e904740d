"""Continual task arithmetic: ``θ^(t) = θ₀ + λ·Σ_{i≤t} τ_i`` as models arrive (baseline).

The continual baseline of OPCM's evaluation (merging.md §10.4, FusionBench ``continual TA``,
λ = 0.3). Data-free; memory holds the base, the running sum and one incoming task vector.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.merge.base import HyperParams
from splice.merge.learned._base import ContinualStep, LearnedMethod, learned
from splice.merge.learned._continual import base_state, sequence
from splice.merge.methods._vectors import add_scaled

__all__ = ["Params", "continual_task_arithmetic"]


class Params(HyperParams):
    scale: float = Field(0.3, description="λ applied to the running sum of task vectors")


def continual_task_arithmetic(
    module: nn.Module | Mapping[str, Tensor],
    deltas: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]],
    *,
    scale: float = 0.3,
    device: str | torch.device | None = None,
) -> Iterator[ContinualStep]:
    """Yield ``θ₀ + scale·Σ_{i≤t} τ_i`` after each task of ``deltas`` (in order)."""
    base, _ = base_state(module, device)
    total: dict[str, Tensor] = {}
    for index, (task, tau) in enumerate(sequence(deltas, base)):
        start = time.perf_counter()
        for n, t in tau.items():
            total[n] = total[n] + t if n in total else t.clone()
        weights = {n: add_scaled(base[n], s, scale).to("cpu") for n, s in total.items()}
        yield ContinualStep(task, index, weights, {"seconds": time.perf_counter() - start})


learned.register("continual_task_arithmetic")(
    LearnedMethod(
        name="continual_task_arithmetic",
        pretty_name="Continual Task Arithmetic",
        reference="https://arxiv.org/abs/2212.04089 (merging.md §10.4 baseline)",
        fn=continual_task_arithmetic,
        Params=Params,
        data="none",
        continual=True,
    )
)
