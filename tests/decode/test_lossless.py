"""The lossless rule samples exactly from the target (spec other.md §1.4): chi-square tests over
toy (p, q) pairs, including p(x)=0 and p=q, and over whole two-token sequences of tiny models."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from splice.decode import CachedLM, LosslessRejection, ModelProposer, Sampling, generate, warp

from .conftest import tiny_llama

N = 20_000


def _one_position(p: torch.Tensor, q: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Emitted-token counts of one draft-then-verify position, and the number of rejections."""
    gen = torch.Generator().manual_seed(seed)
    rule, counts, rejected = LosslessRejection(), torch.zeros(len(p)), 0
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).tolist()
    bonus = torch.zeros(len(p))  # p_{γ+1}: unused when the draft is rejected
    bonus[0] = 1.0
    for x in drafts:
        acc = rule.accept([x], q[None], torch.stack([p, bonus]), gen)
        counts[x if acc.n == 1 else acc.token] += 1
        rejected += acc.n == 0
    return counts, rejected


def _assert_law(counts: torch.Tensor, p: torch.Tensor) -> None:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token the target never emits was emitted"
    stat = chisquare(counts[keep].numpy(), (p[keep] / p[keep].sum() * counts.sum()).numpy())
    assert stat.pvalue > 1e-3, stat


@pytest.mark.parametrize(
    "p,q",
    [
        ([0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.3, 0.2, 0.3]),  # p(x)=0 where q(x)>0
        ([0.05, 0.05, 0.6, 0.3, 0.0], [0.7, 0.1, 0.1, 0.1, 0.0]),
        ([0.3, 0.0, 0.0, 0.7, 0.0], [0.0, 0.5, 0.5, 0.0, 0.0]),  # disjoint: always reject
    ],
)
def test_one_position_has_the_target_law(p: list[float], q: list[float]) -> None:
    p_, q_ = torch.tensor(p), torch.tensor(q)
    counts, rejected = _one_position(p_, q_)
    _assert_law(counts, p_)
    beta = float(torch.minimum(p_, q_).sum())
    assert abs(rejected / N - (1 - beta)) < 4 * (beta * (1 - beta) / N) ** 0.5 + 1e-9


def test_p_equals_q_never_rejects() -> None:
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    counts, rejected = _one_position(p, p.clone())
    assert rejected == 0
    _assert_law(counts, p)


def test_the_test_detects_the_draft_law() -> None:
    """Power check: the chi-square used above rejects the drafter's law as the target's."""
    p, q = torch.tensor([0.5, 0.2, 0.2, 0.1]), torch.tensor([0.1, 0.1, 0.4, 0.4])
    counts = torch.bincount(torch.multinomial(q, N, replacement=True), minlength=4).float()
    assert chisquare(counts.numpy(), (p * N).numpy()).pvalue < 1e-6


def _exact_pairs(model: torch.nn.Module, prompt: list[int], s: Sampling) -> torch.Tensor:
    """P(y1, y2 | prompt) under φ(model), by enumeration: ``(V, V)``."""
    with torch.no_grad():
        p1 = warp(model(torch.tensor([prompt])).logits[0, -1], s)
        v = len(p1)
        seqs = torch.tensor([[*prompt, a] for a in range(v)])
        p2 = warp(model(seqs).logits[:, -1], s)
    return p1[:, None] * p2


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=4, top_p=0.9)],
    ids=["t1", "topk-topp"],
)
def test_speculative_sequences_have_the_target_law(sampling: Sampling) -> None:
    target = tiny_llama(vocab=6, seed=1, sharpen=8.0)
    drafter = tiny_llama(vocab=6, layers=1, seed=2, sharpen=8.0)
    prompt = [1, 4, 2]
    exact = _exact_pairs(target, prompt, sampling).flatten()
    t, d = CachedLM(target), ModelProposer(drafter)
    n, counts = 2500, torch.zeros(36)
    for seed in range(n):
        out = generate(
            prompt, target=t, proposer=d, sampling=sampling, gamma=2, max_new_tokens=2, seed=seed
        )
        assert out.lossless
        counts[out.tokens[0] * 6 + out.tokens[1]] += 1
    assert 0.05 < out.metrics["alpha"] < 0.999  # the drafter differs from the target
    _assert_law(counts, exact)


def test_sequence_test_detects_the_drafter() -> None:
    """Power check on the same setting: the drafter's own law fails the same test."""
    s = Sampling()
    target = tiny_llama(vocab=6, seed=1, sharpen=8.0)
    drafter = tiny_llama(vocab=6, layers=1, seed=2, sharpen=8.0)
    exact, other = (_exact_pairs(m, [1, 4, 2], s).flatten() for m in (target, drafter))
    counts = torch.bincount(torch.multinomial(other, 2500, replacement=True), minlength=36)
    keep = exact > 0
    assert (
        counts[~keep].sum() > 0
        or chisquare(
            counts[keep].numpy(), (exact[keep] / exact[keep].sum() * counts[keep].sum()).numpy()
        ).pvalue
        < 1e-6
    )
