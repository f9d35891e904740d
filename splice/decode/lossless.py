"""Acceptance policies that keep the target's output distribution (spec other.md §1.3–1.5).

:class:`LosslessRejection` is Leviathan et al.'s / Chen et al.'s rule: accept ``x_i`` with
probability ``min(1, p_i(x_i)/q_i(x_i))``; on the first rejection sample the residual
``max(0, p − q)`` normalised; after ``γ`` acceptances sample a bonus token from ``p_{γ+1}``.
Each emitted token then has the law ``p`` exactly (§1.4). :class:`GreedyMatch` is the
temperature-0 case (§1.5): accept while the draft equals the target's argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from splice.decode.sampling import sample

__all__ = ["Accepted", "GreedyMatch", "LosslessRejection"]


@dataclass
class Accepted:
    """``n`` leading draft tokens accepted, then ``token`` (correction or bonus); ``beta`` is
    ``Σ_v min(p_i, q_i)(v)`` per verified position (its mean estimates α, §1.6)."""

    n: int
    token: int
    beta: list[float]


class LosslessRejection:
    """Exact speculative sampling: the output law equals sampling φ(target) alone."""

    name = "lossless"
    lossless = True
    chain = True

    def accept(
        self, tokens: Sequence[int], q: Tensor, p: Tensor, gen: torch.Generator | None
    ) -> Accepted:
        """``q``: ``(γ, V)`` draft probabilities; ``p``: ``(γ+1, V)`` target probabilities."""
        beta: list[float] = []
        for i, x in enumerate(tokens):
            beta.append(float(torch.minimum(p[i], q[i]).sum()))
            r = float(torch.rand((), generator=gen))
            if r * float(q[i, x]) <= float(p[i, x]) and float(p[i, x]) > 0:
                continue
            residual = (p[i] - q[i]).clamp_min(0)
            mass = float(residual.sum())
            dist = residual / mass if mass > 0 else p[i]  # mass 0 only by rounding when p≈q
            return Accepted(i, sample(dist, gen), beta)
        return Accepted(len(tokens), sample(p[len(tokens)], gen), beta)


class GreedyMatch:
    """Temperature 0: accept while ``x_i = argmax p_i``; emit ``argmax p_{n+1}`` (§1.5)."""

    name = "greedy"
    lossless = True
    chain = True

    def accept(
        self, tokens: Sequence[int], q: Tensor, p: Tensor, gen: torch.Generator | None
    ) -> Accepted:
        best = p.argmax(-1).tolist()
        beta: list[float] = []
        for i, x in enumerate(tokens):
            beta.append(float(x == best[i]))
            if x != best[i]:
                return Accepted(i, best[i], beta)
        return Accepted(len(tokens), best[len(tokens)], beta)
