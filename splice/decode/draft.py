"""A draft-model proposer: any causal LM sharing the target's vocabulary (spec other.md §1.3
step 1), including the target's own first layers (:func:`splice.decode.selfdraft.early_exit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splice.decode.base import Candidates, Draft
from splice.decode.lean import LeanLM
from splice.decode.lm import CachedLM
from splice.decode.sampling import Sampling, sample, warp

__all__ = ["ModelProposer"]


class ModelProposer:
    """Drafts autoregressively from ``model``: ``x_i ~ φ(M_q(· | prefix, x_<i))``."""

    def __init__(self, model: nn.Module | CachedLM | LeanLM, name: str = "draft") -> None:
        self.lm = model if isinstance(model, (CachedLM, LeanLM)) else CachedLM(model, name)
        self.name = name

    def draft(
        self, ids: Sequence[int], gamma: int, sampling: Sampling, gen: torch.Generator | None
    ) -> Draft:
        cur, qs = list(ids), []
        for _ in range(gamma):
            q = warp(self.lm.logits(cur, 1)[0], sampling)
            cur.append(sample(q, None if sampling.greedy else gen))
            qs.append(q)
        tokens = cur[len(ids) :]
        return Draft(tokens, torch.stack(qs) if qs else torch.empty(0))

    def candidates(self, ids: Sequence[int], k: int) -> Candidates:
        logq = torch.log_softmax(self.lm.logits(ids, 1)[0], -1)
        top = logq.topk(k)
        return Candidates(top.indices, top.values)
