"""An n-gram (prompt-lookup) proposer: no second model (spec other.md §1.9 (a)).

The longest suffix of the current text (up to ``max_n`` tokens, at least ``min_n``) that
occurred earlier is looked up; the tokens that followed its latest earlier occurrence are the
draft. The draft is deterministic, so its distribution ``q`` is one-hot, which keeps the
lossless rule exact (accept ``x`` with probability ``p(x)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splice.decode.base import Draft
from splice.decode.sampling import Sampling

__all__ = ["NgramProposer"]


class NgramProposer:
    """Copies the continuation of the latest earlier match of the text's suffix."""

    name = "ngram"

    def __init__(self, vocab_size: int, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.vocab_size, self.max_n, self.min_n = vocab_size, max_n, min_n

    def lookup(self, ids: Sequence[int], gamma: int) -> list[int]:
        """The draft tokens (possibly none) for ``ids``."""
        ids = list(ids)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            suffix = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest earlier occurrence first
                if ids[start : start + n] == suffix:
                    return ids[start + n : start + n + gamma]
        return []

    def draft(
        self, ids: Sequence[int], gamma: int, sampling: Sampling, gen: torch.Generator | None
    ) -> Draft:
        tokens = self.lookup(ids, gamma)
        q = torch.nn.functional.one_hot(torch.tensor(tokens, dtype=torch.long), self.vocab_size)
        return Draft(tokens, q.float())
