"""Re-ranking of the drafter's top-k by a scorer (spec other.md §1.9 (c), §2.3 step 4, §3.4).

The combined score is ``σ(c) = log q(c) + w · score(c)``: AMBEDKAR uses ``score = −D`` and
``w = α`` (so ``σ = ℓ_q − α D``); ARGS / CD / Transfer Q* use ``score = Q̂`` and ``w = 1/α``.
Mode ``greedy`` takes ``argmax σ``; mode ``sample`` draws from ``softmax(σ / T)`` over the ``k``
candidates. With ``min_score`` set, the drafter's top-1 is accepted as is when its score
reaches it (accept-else-rerank, §2.3). The output is **not** the target's distribution.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from splice._schema import Strict
from splice.decode.base import Candidates

__all__ = ["RerankTopK"]


class RerankTopK(Strict):
    """Pick one of the ``k`` drafted candidates by ``log q + weight · score``."""

    k: int = Field(5, ge=1, description="candidates drafted per step")
    weight: float = Field(1.0, description="w in log q + w·score (AMBEDKAR α, TQ* 1/α)")
    mode: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(0.7, gt=0, description="softmax temperature of mode 'sample'")
    min_score: float | None = Field(
        None, description="accept the drafter's top-1 when its score is at least this"
    )

    name: Literal["rerank"] = "rerank"

    @property
    def lossless(self) -> bool:
        return False

    def combine(self, cand: Candidates, scores: Tensor) -> Tensor:
        """σ per candidate."""
        return cand.logq.float() + self.weight * scores.float()

    def select(self, cand: Candidates, scores: Tensor, gen: torch.Generator | None) -> int:
        """The index (into ``cand``) of the emitted candidate."""
        top1 = int(cand.logq.argmax())
        if self.min_score is not None and float(scores[top1]) >= self.min_score:
            return top1
        sigma = self.combine(cand, scores)
        if self.mode == "greedy":
            return int(sigma.argmax())
        return int(torch.multinomial(torch.softmax(sigma / self.temperature, -1), 1, generator=gen))
