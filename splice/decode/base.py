"""The three pluggable parts of the guided speculative engine (spec other.md §1.9).

* a **proposer** drafts a chain of ``γ`` tokens with their drafter distributions (for the
  lossless and greedy policies) or the top-``k`` candidates of one position with their
  log-probs (for re-ranking);
* a **scorer** gives a score per candidate (a counterfactual divergence, a value estimate);
  for the lossless policies the scorer is the target model itself;
* an **acceptance policy** decides which drafted tokens are emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from splice.decode.sampling import Sampling

__all__ = ["Candidates", "Draft", "Proposer", "Scorer"]


@dataclass
class Draft:
    """A drafted chain: ``tokens[i]`` was drawn from ``q[i]`` (``(γ, V)`` probabilities)."""

    tokens: list[int]
    q: Tensor


@dataclass
class Candidates:
    """Alternatives for one position: token ids ``(k,)`` and the drafter's log-probs ``(k,)``."""

    tokens: Tensor
    logq: Tensor


class Proposer(Protocol):
    name: str

    def draft(
        self, ids: Sequence[int], gamma: int, sampling: Sampling, gen: torch.Generator | None
    ) -> Draft:
        """Up to ``gamma`` tokens continuing ``ids`` (fewer, even none, is allowed)."""
        ...

    def candidates(self, ids: Sequence[int], k: int) -> Candidates:
        """The ``k`` most likely next tokens after ``ids``."""
        ...


class Scorer(Protocol):
    name: str
    calls: int  # verifier/value-model forward passes so far

    def score(self, ids: Sequence[int], prompt_len: int, cand: Candidates) -> Tensor:
        """A score ``(k,)`` per candidate, higher is better; ``ids[:prompt_len]`` is the prompt."""
        ...
