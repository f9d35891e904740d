"""Greedy equivalence, KV-cache rollback, self-speculation views, n-gram drafts, metadata and
bad input of the guided speculative engine (spec other.md §1.3–1.5, §1.9)."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.decode import (
    CachedLM,
    Candidates,
    GreedyMatch,
    ModelProposer,
    NgramProposer,
    RerankTopK,
    Sampling,
    early_exit,
    generate,
)
from splice.errors import SpliceError

from .conftest import tiny_llama

GREEDY = Sampling(temperature=0)


def _reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_plain_greedy_matches_a_cache_free_reference() -> None:
    model = tiny_llama(vocab=50, seed=3, sharpen=4.0)
    out = generate([5, 9, 2], target=CachedLM(model), sampling=GREEDY, max_new_tokens=12)
    assert out.tokens == _reference_greedy(model, [5, 9, 2], 12)
    assert out.lossless and out.metrics["tokens_per_target_call"] == 1.0


def test_speculative_greedy_equals_target_greedy_on_50_prompts() -> None:
    target = tiny_llama(vocab=50, layers=4, seed=4, sharpen=4.0)
    t = CachedLM(target)
    other = copy.deepcopy(target)  # a separate model that often, not always, agrees
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight))
    drafters = {
        "self": ModelProposer(early_exit(target, 2)),
        "other": ModelProposer(other),
        "ngram": NgramProposer(50),
    }
    g = torch.Generator().manual_seed(0)
    accepted = dict.fromkeys(drafters, 0)
    for i in range(50):
        prompt = torch.randint(0, 50, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g)
        ref = generate(prompt.tolist(), target=t, sampling=GREEDY, max_new_tokens=10).tokens
        for name, d in drafters.items():
            out = generate(
                prompt.tolist(),
                target=t,
                proposer=d,
                sampling=GREEDY,
                gamma=1 + i % 4,
                max_new_tokens=10,
            )
            assert out.tokens == ref, (name, i)
            accepted[name] += out.metrics["accepted"]
    assert all(v > 0 for v in accepted.values()), accepted  # the drafts were really used


def test_rollback_leaves_the_cache_of_a_fresh_prefix_run() -> None:
    model = tiny_llama(vocab=20, seed=6)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    lm = CachedLM(model)
    lm.logits(ids, 1)
    lm.rollback(5)
    fresh = CachedLM(model)
    fresh.logits(ids[:5], 1)
    assert lm.ids == fresh.ids == ids[:5]
    for a, b in zip(lm.cache.layers, fresh.cache.layers, strict=True):  # type: ignore[union-attr]
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
    # a diverging continuation after the rollback is scored as from scratch
    other = [*ids[:5], 11, 12]
    with torch.no_grad():
        full = model(torch.tensor([other])).logits[0, -2:]
    torch.testing.assert_close(lm.logits(other, 2), full, atol=1e-5, rtol=1e-5)


def test_early_exit_is_the_first_k_blocks_with_the_shared_head() -> None:
    from transformers import LlamaForCausalLM

    model = tiny_llama(vocab=20, layers=4, seed=7)
    x = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        before = model(x).logits
        view = early_exit(model, 2)
        cfg = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": 2})
        small = LlamaForCausalLM(cfg).eval()
        small.load_state_dict(model.state_dict(), strict=False)
        torch.testing.assert_close(view(x).logits, small(x).logits)
        torch.testing.assert_close(model(x).logits, before)  # the target is untouched
    assert view.lm_head.weight is model.lm_head.weight
    with pytest.raises(SpliceError, match="outside"):
        early_exit(model, 4)


def test_ngram_lookup_copies_the_latest_match() -> None:
    ng = NgramProposer(100, max_n=2)
    assert ng.lookup([7, 8, 9, 1, 7, 8, 5, 7, 8], 3) == [5, 7, 8]
    assert ng.lookup([1, 2, 3], 2) == []


def test_metrics_and_metadata() -> None:
    target = tiny_llama(vocab=30, layers=3, seed=8)
    t = CachedLM(target)
    out = generate(
        [1, 2],
        target=t,
        proposer=ModelProposer(early_exit(target, 1)),
        sampling=Sampling(temperature=0.7),
        gamma=3,
        max_new_tokens=20,
    )
    m = out.metrics
    assert out.lossless and out.policy == "lossless" and m["new_tokens"] == len(out.tokens) == 20
    assert m["target_calls"] == m["steps"] and 1 <= m["tokens_per_target_call"] <= 4
    assert m["accepted"] + m["steps"] == 20 and 0 <= m["alpha"] <= 1
    greedy_policy_sampled = generate(
        [1, 2], target=t, proposer=ModelProposer(target), policy=GreedyMatch(), max_new_tokens=3
    )
    assert not greedy_policy_sampled.lossless  # argmax matching under T>0 is not φ(target)


class _NoiseScorer:
    name, calls = "noise", 0

    def score(self, ids: list[int], prompt_len: int, cand: Candidates) -> torch.Tensor:
        self.calls += 1
        return torch.randn(len(cand.tokens)) * 100


def test_rerank_with_zero_weight_is_greedy_drafter_decoding() -> None:
    drafter = tiny_llama(vocab=40, seed=9, sharpen=3.0)
    ref = _reference_greedy(drafter, [4, 2], 15)
    out = generate(
        [4, 2],
        proposer=ModelProposer(drafter),
        policy=RerankTopK(k=5, weight=0.0),
        scorer=_NoiseScorer(),
        max_new_tokens=15,
    )
    assert out.tokens == ref and not out.lossless
    noisy = generate(
        [4, 2],
        proposer=ModelProposer(drafter),
        policy=RerankTopK(k=5, weight=1.0),
        scorer=_NoiseScorer(),
        max_new_tokens=15,
    )
    assert noisy.tokens != ref


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gamma": 0}, "gamma=0 must be >= 1"),
        ({"prompt": []}, "the prompt is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_bad_input_is_one_line(kwargs: dict, match: str) -> None:
    args = {"prompt": [1], "target": CachedLM(tiny_llama(vocab=8)), **kwargs}
    with pytest.raises(SpliceError, match=match) as e:
        generate(args.pop("prompt"), **args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("top_p", [0.0, 1.5, -0.1])
def test_top_p_outside_the_unit_interval_is_refused(top_p: float) -> None:
    from splice._schema import validate

    with pytest.raises(SpliceError, match=rf"top_p={top_p} is outside \(0, 1\]"):
        validate(Sampling, {"top_p": top_p})


def test_drafter_with_another_vocabulary_is_refused_under_lossless() -> None:
    t = CachedLM(tiny_llama(vocab=8))
    d = ModelProposer(tiny_llama(vocab=9, seed=1))
    with pytest.raises(SpliceError, match="drafter's vocabulary has 9 tokens, the target's 8"):
        generate([1, 2], target=t, proposer=d, max_new_tokens=4)
