"""Transfer Q*, CD and ARGS as configurations of one rollout value scorer (spec other.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from splice.decode import CachedLM, Candidates, ModelProposer, RerankTopK, Sampling, generate
from splice.decode.tq import RolloutValueScorer, args_scorer, cd_scorer, tq_scorer
from splice.errors import SpliceError

from .conftest import tiny_llama


def _count(token: int):
    """A toy reward: the share of generated tokens equal to ``token``."""

    def reward(ids, prompt_len):
        gen = ids[prompt_len:]
        return sum(t == token for t in gen) / max(len(gen), 1)

    return reward


def test_self_normalisation_with_one_rollout_is_refused() -> None:
    with pytest.raises(SpliceError, match="n_rollouts=1 reduce to the plain reward"):
        tq_scorer(tiny_llama(), _count(1), n_rollouts=1, baseline_reward=_count(2))
    tq_scorer(
        tiny_llama(), _count(1), n_rollouts=1, baseline_reward=_count(2), is_normalization="none"
    )


def test_args_scores_the_partial_sequence() -> None:
    s = args_scorer(_count(3))
    scores = s.score([1, 2, 3], 2, Candidates(torch.tensor([3, 4]), torch.zeros(2)))
    assert scores.tolist() == [1.0, 0.5]


def test_direct_transfer_is_the_reward_of_the_baselines_greedy_rollout() -> None:
    baseline = tiny_llama(vocab=10, seed=21, sharpen=3.0)
    s = tq_scorer(baseline, _count(7), horizon=6)
    ids = [1, 2, 5]
    cont = [*ids, 4]
    with torch.no_grad():
        for _ in range(6):
            cont.append(int(baseline(torch.tensor([cont])).logits[0, -1].argmax()))
    assert s.value([*ids, 4], 3) == pytest.approx(_count(7)(cont, 3))


def test_indirect_transfer_self_normalises_the_importance_weights() -> None:
    baseline = tiny_llama(vocab=10, seed=22)
    r, rb = _count(7), _count(2)
    kw = dict(horizon=5, n_rollouts=3, baseline_reward=rb, sampling=Sampling(temperature=1.0))
    s = tq_scorer(baseline, r, beta=0.5, **kw)
    seqs = s.rollouts([3, 4])
    assert len({tuple(x) for x in seqs}) > 1  # sampled rollouts differ
    w = [math.exp((r(x, 1) - rb(x, 1)) / 0.5) for x in seqs]
    expect = sum(wi / (sum(w) / 3) * r(x, 1) for wi, x in zip(w, seqs, strict=True)) / 3
    assert s.value([3, 4], 1) == pytest.approx(expect)
    raw = tq_scorer(baseline, r, beta=0.5, is_normalization="none", **kw)
    expect_raw = sum(wi * r(x, 1) for wi, x in zip(w, seqs, strict=True)) / 3
    assert raw.value([3, 4], 1) == pytest.approx(expect_raw)


def test_value_guidance_raises_the_reward_over_the_sft_policy() -> None:
    sft = tiny_llama(vocab=10, seed=23, sharpen=2.0)
    reward = _count(7)
    plain = generate(
        [1, 2], target=CachedLM(sft), sampling=Sampling(temperature=0), max_new_tokens=8
    )
    scorers = {"args": args_scorer(reward), "cd": cd_scorer(sft, reward, horizon=4)}
    for name, scorer in scorers.items():
        out = generate(
            [1, 2],
            proposer=ModelProposer(sft),
            scorer=scorer,
            policy=RerankTopK(k=10, weight=20.0),
            max_new_tokens=8,
        )
        assert reward([1, 2, *out.tokens], 2) > reward([1, 2, *plain.tokens], 2), name
    assert isinstance(scorers["cd"], RolloutValueScorer) and scorers["cd"].name == "cd"


def test_diversity_follows_the_rep_n_formula() -> None:
    from splice.decode.quality import diversity

    # 6 distinct words: n-grams are all unique; rep_n = 100 (1 − g/(g+1))
    expect = (1 - 1 / 6) * (1 - 1 / 5) * (1 - 1 / 4)
    assert diversity("a b c d e f") == pytest.approx(expect)
    assert diversity("go go go go go go") < diversity("a b c d e f")


def test_coherence_is_the_mean_row_cosine() -> None:
    from splice.decode.quality import coherence

    table = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [1.0, 1.0]}

    def embed(texts):
        return torch.tensor([table[t] for t in texts])

    assert coherence(["x", "x"], ["x", "y"], embed) == pytest.approx(0.5)
    assert coherence(["z"], ["x"], embed) == pytest.approx(2**-0.5)


def _greedy_rollout(model, ctx: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ctx + out])).logits[0, -1].argmax())
            out.append(t)
            if t == eos:
                break
    return out


def test_batched_rollouts_equal_one_by_one_rollouts_from_the_baselines_own_prompt() -> None:
    baseline = tiny_llama(vocab=12, seed=24, sharpen=3.0)
    rewards: list[tuple[int, ...]] = []

    def reward(ids, prompt_len):
        rewards.append(tuple(ids))
        return float(len(ids))

    own = [9, 9, 1]  # the rollout policy's prompt, in place of the policy's [1, 2]
    s = tq_scorer(baseline, reward, horizon=5, eos=[3], rollout_prompt=own)
    ids, cands = [1, 2, 5, 6], torch.tensor([4, 3, 0, 7])
    s.score(ids, 2, Candidates(cands, torch.zeros(4)))
    for c, seq in zip(cands.tolist(), rewards, strict=True):
        tau = [] if c == 3 else _greedy_rollout(baseline, [*own, 5, 6, c], 5, eos=3)
        assert list(seq) == [*ids, c, *tau]  # the reward reads the policy's prompt
    assert s.lm.calls == 1 + 5  # the context once, then one batched call per rollout step
