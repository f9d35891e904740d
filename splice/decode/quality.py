"""Generation-quality metrics of Transfer Q*'s evaluation (spec other.md §3.6).

* **diversity** ``= Π_{n=2..4} (1 − rep_n / 100)`` with
  ``rep_n = 100 (1 − #unique n-grams / (#n-grams + 1))`` over word tokens;
* **coherence**: cosine similarity between embeddings of prompt and response, averaged over
  examples (the paper uses SimCSE; pass any sentence embedder, e.g. MiniLM).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["coherence", "diversity"]


def diversity(text: str) -> float:
    """Π over n = 2, 3, 4 of ``1 − rep_n / 100`` (word tokens, punctuation split off)."""
    words = re.findall(r"\w+|[^\w\s]", text)
    out = 1.0
    for n in (2, 3, 4):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        rep = 100 * (1 - len(set(grams)) / (len(grams) + 1))
        out *= 1 - rep / 100
    return out


def coherence(
    prompts: Sequence[str], responses: Sequence[str], embed: Callable[[list[str]], Tensor]
) -> float:
    """Mean cosine between ``embed(prompts)`` and ``embed(responses)`` row by row."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(
            f"need as many responses as prompts (>0), got {len(prompts)}/{len(responses)}"
        )
    a, b = embed(list(prompts)).float(), embed(list(responses)).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
