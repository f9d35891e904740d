"""Constrained decoding to a closed set of answers: a token trie of the allowed sequences.

:class:`AnswerTrie` holds each allowed answer as a token sequence ending in the end token.
``allowed(prefix)`` lists the tokens that keep a generated prefix inside the set, so greedy
decoding that picks the best allowed token at every step can only emit one of the answers
(it ends exactly when an answer is complete, with the end token).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["AnswerTrie"]


class AnswerTrie:
    """The allowed token sequences (each answer's tokens plus ``end``) as a prefix tree."""

    def __init__(self, answers: Sequence[Sequence[int]], end: int) -> None:
        if not answers:
            raise ValueError("no answers to constrain to")
        self.end = end
        self.root: dict[int, dict] = {}
        self._depth = 1 + max(len(seq) for seq in answers)
        for seq in answers:
            node = self.root
            for token in [*seq, end]:
                node = node.setdefault(int(token), {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow ``prefix``; ``[]`` once a whole answer (with its end token)
        was generated or the prefix left the set."""
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return []
        return sorted(node)

    @property
    def depth(self) -> int:
        """The longest allowed sequence, end token included."""
        return self._depth
