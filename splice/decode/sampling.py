"""The logit processor φ applied identically to target and drafter (spec other.md §1.2).

Temperature 0 is greedy: φ gives the one-hot argmax, under which the lossless rule reduces to
greedy matching (§1.5). Top-k and top-p (nucleus) are applied after the temperature.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from splice._schema import Strict

__all__ = ["Sampling", "sample", "warp"]


class Sampling(Strict):
    """How a next-token distribution is shaped before sampling (or before the lossless test)."""

    temperature: float = Field(1.0, description="0 = greedy (argmax); default 1.0 (§1.7)")
    top_k: int | None = Field(None, description="keep the k most likely tokens (None: all)")
    top_p: float = Field(1.0, description="nucleus mass in (0, 1]; 1 keeps every token")

    @field_validator("temperature")
    @classmethod
    def _t(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"temperature={v} must be >= 0 (0 means greedy)")
        return v

    @field_validator("top_k")
    @classmethod
    def _k(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"top_k={v} must be >= 1 (or unset for no top-k)")
        return v

    @field_validator("top_p")
    @classmethod
    def _p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"top_p={v} is outside (0, 1]")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: Tensor, s: Sampling) -> Tensor:
    """Probabilities φ(logits) over the last dimension (float32)."""
    logits = logits.float()
    if s.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, gen: torch.Generator | None) -> int:
    """One token from a 1-D distribution; the argmax when ``gen`` is None."""
    if gen is None:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=gen))
