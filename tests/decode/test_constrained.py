"""AnswerTrie: only whole answers (plus the end token) can be generated."""

from __future__ import annotations

import random

import pytest

from splice.decode.constrained import AnswerTrie


def test_allowed_tokens_follow_the_answers():
    trie = AnswerTrie([[1, 2], [1, 3, 4], [5]], end=0)
    assert trie.allowed([]) == [1, 5]
    assert trie.allowed([1]) == [2, 3]
    assert trie.allowed([1, 2]) == [0]
    assert trie.allowed([1, 2, 0]) == [] and trie.allowed([7]) == []
    assert trie.depth == 4


def test_greedy_under_the_trie_always_ends_on_an_answer():
    rng = random.Random(0)
    answers = [[rng.randrange(1, 20) for _ in range(rng.randint(1, 4))] for _ in range(6)]
    trie = AnswerTrie(answers, end=0)
    for _ in range(200):
        out: list[int] = []
        while (options := trie.allowed(out)) and (not out or out[-1] != 0):
            out.append(max(options, key=lambda _: rng.random()))
        assert out[-1] == 0 and out[:-1] in answers


def test_no_answers_is_an_error():
    with pytest.raises(ValueError, match="no answers"):
        AnswerTrie([], end=0)
