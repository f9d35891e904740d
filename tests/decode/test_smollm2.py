"""Real model (slow): speculative greedy decoding of SmolLM2-135M-Instruct equals its plain
greedy decoding, with self-speculation (early exit, int8 copy) and n-gram drafters (issue #29)."""

from __future__ import annotations

import pytest

from splice.decode import (
    CachedLM,
    ModelProposer,
    NgramProposer,
    Sampling,
    early_exit,
    generate,
    int8_draft,
)

pytestmark = pytest.mark.slow


def test_smollm2_speculative_greedy_equals_plain() -> None:
    from splice.data.causal_lm import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    target, greedy = CachedLM(model), Sampling(temperature=0)
    prompts = ["The capital of France is", "def add(a, b):\n    return", "One, two, three,"]
    drafters = [
        ModelProposer(early_exit(model, 24)),
        ModelProposer(int8_draft(model), "int8"),
        NgramProposer(model.config.vocab_size),
    ]
    for text in prompts:
        ids = tok.encode(text, add_special_tokens=False)
        ref = generate(ids, target=target, sampling=greedy, max_new_tokens=16)
        for d in drafters:
            out = generate(ids, target=target, proposer=d, sampling=greedy, max_new_tokens=16)
            assert out.tokens == ref.tokens, (text, d.name)
