"""The guided speculative decoding engine (spec other.md §1.9): proposer → scorer → policy.

One loop serves every configuration:

* **plain** decoding (no proposer): one target call per token, sampled from φ(p);
* **speculative** (a chain policy, :class:`~splice.decode.lossless.LosslessRejection` or
  :class:`~splice.decode.lossless.GreedyMatch`): the proposer drafts ``γ`` tokens, the target
  scores all of them in one call, the policy keeps a prefix and adds one token; both KV caches
  roll back to the accepted length (:class:`~splice.decode.lm.CachedLM`);
* **re-ranking** (:class:`~splice.decode.rerank.RerankTopK`): the proposer drafts ``k``
  candidates, a scorer scores them, the policy picks one (AMBEDKAR, ARGS, CD, Transfer Q*).

Every :class:`Generation` carries ``lossless``: True only for plain decoding and the chain
policies, whose output distribution is the target's (φ-warped); re-ranked output is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from splice.decode.base import Proposer, Scorer
from splice.decode.lean import LeanLM
from splice.decode.lm import CachedLM
from splice.decode.lossless import Accepted, GreedyMatch, LosslessRejection
from splice.decode.rerank import RerankTopK
from splice.decode.sampling import Sampling, sample, warp
from splice.errors import SpliceError

__all__ = ["Generation", "generate"]

Policy = LosslessRejection | GreedyMatch | RerankTopK


@dataclass
class Generation:
    """New tokens and the run's metrics (α, tokens per target call, speed)."""

    tokens: list[int]
    policy: str
    lossless: bool
    metrics: dict[str, float | int | None] = field(default_factory=dict)


@dataclass
class _Tally:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    beta: list[float] = field(default_factory=list)


def generate(
    prompt: Sequence[int],
    *,
    target: CachedLM | LeanLM | None = None,
    proposer: Proposer | None = None,
    policy: Policy | None = None,
    scorer: Scorer | None = None,
    sampling: Sampling | None = None,
    gamma: int = 4,
    max_new_tokens: int = 64,
    eos: Sequence[int] = (),
    seed: int = 42,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` tokens after ``prompt`` (batch size 1, §1.7).

    ``target`` is needed for plain and speculative decoding; ``policy`` defaults to
    :class:`GreedyMatch` at temperature 0 and :class:`LosslessRejection` otherwise.
    """
    sampling = sampling or Sampling()
    policy = policy or (GreedyMatch() if sampling.greedy else LosslessRejection())
    _check(prompt, gamma, max_new_tokens, target, proposer, policy, scorer)
    gen = torch.Generator().manual_seed(seed)
    ids, prompt_len, tally = list(prompt), len(prompt), _Tally()
    counters = {"target": target, "drafter": getattr(proposer, "lm", None), "scorer": scorer}
    calls0 = {k: m.calls for k, m in counters.items() if m is not None}
    t0 = time.perf_counter()
    while len(ids) - prompt_len < max_new_tokens:
        budget = max_new_tokens - (len(ids) - prompt_len)
        if isinstance(policy, RerankTopK):
            new = _rerank_step(ids, prompt_len, proposer, scorer, policy, gen)  # type: ignore[arg-type]
        else:
            new = _chain_step(ids, target, proposer, policy, sampling, gamma, budget, gen, tally)  # type: ignore[arg-type]
        tally.steps += 1
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        new = new if stop is None else new[: stop + 1]
        ids.extend(new)
        if on_tokens is not None:
            on_tokens(new)
        if stop is not None:
            break
    seconds = time.perf_counter() - t0
    calls = {k: counters[k].calls - c for k, c in calls0.items()}  # type: ignore[union-attr]
    n_new = len(ids) - prompt_len
    main = calls.get("target", calls.get("scorer", tally.steps))
    metrics: dict[str, float | int | None] = {
        "new_tokens": n_new,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(n_new / seconds, 3) if seconds > 0 else None,
        "steps": tally.steps,
        "target_calls": main,
        "tokens_per_target_call": round(n_new / main, 4) if main else None,
        "drafter_calls": calls.get("drafter"),
        "scorer_calls": calls.get("scorer"),
        "drafted": tally.drafted,
        "accepted": tally.accepted,
        "acceptance_rate": round(tally.accepted / tally.drafted, 4) if tally.drafted else None,
        "alpha": round(sum(tally.beta) / len(tally.beta), 4) if tally.beta else None,
        "gamma": gamma if proposer is not None and not isinstance(policy, RerankTopK) else None,
    }
    lossless = policy.lossless and not (isinstance(policy, GreedyMatch) and not sampling.greedy)
    return Generation(ids[prompt_len:], policy.name if proposer else "plain", lossless, metrics)


def _chain_step(
    ids: list[int],
    target: CachedLM | LeanLM,
    proposer: Proposer | None,
    policy: LosslessRejection | GreedyMatch,
    sampling: Sampling,
    gamma: int,
    budget: int,
    gen: torch.Generator,
    tally: _Tally,
) -> list[int]:
    g = min(gamma, budget - 1)
    if proposer is None or g == 0:
        p = warp(target.logits(ids, 1)[0], sampling)
        return [sample(p, None if sampling.greedy else gen)]
    d = proposer.draft(ids, g, sampling, None if sampling.greedy else gen)
    logits = target.logits(ids + d.tokens, len(d.tokens) + 1)
    if d.tokens and d.q.shape[-1] != logits.shape[-1]:
        raise SpliceError(
            f"the drafter's vocabulary has {d.q.shape[-1]} tokens, the target's {logits.shape[-1]}",
            fix="a lossless policy needs a drafter with the target's tokenizer",
        )
    p = warp(logits, sampling)
    acc: Accepted = policy.accept(d.tokens, d.q, p, gen)
    tally.drafted += len(d.tokens)
    tally.accepted += acc.n
    tally.beta.extend(acc.beta)
    return [*d.tokens[: acc.n], acc.token]


def _rerank_step(
    ids: list[int],
    prompt_len: int,
    proposer: Proposer,
    scorer: Scorer,
    policy: RerankTopK,
    gen: torch.Generator,
) -> list[int]:
    joint = getattr(scorer, "propose_and_score", None)  # drafter + scorer in one forward
    both = joint(proposer, ids, prompt_len, policy.k) if joint is not None else None
    if both is None:
        cand = proposer.candidates(ids, policy.k)
        scores = scorer.score(ids, prompt_len, cand)
    else:
        cand, scores = both
    return [int(cand.tokens[policy.select(cand, scores, gen)])]


def _check(
    prompt: Sequence[int],
    gamma: int,
    max_new_tokens: int,
    target: CachedLM | LeanLM | None,
    proposer: Proposer | None,
    policy: Policy,
    scorer: Scorer | None,
) -> None:
    if len(prompt) == 0:
        raise SpliceError("the prompt is empty", fix="give at least one prompt token")
    if gamma < 1:
        raise SpliceError(f"gamma={gamma} must be >= 1 (tokens drafted per target call)")
    if max_new_tokens < 1:
        raise SpliceError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if isinstance(policy, RerankTopK):
        if proposer is None or scorer is None or not hasattr(proposer, "candidates"):
            raise SpliceError(
                "policy 'rerank' needs a proposer with top-k candidates and a scorer",
                fix="use a draft model (not the n-gram proposer) and give a scorer",
            )
    elif target is None:
        raise SpliceError(f"policy {policy.name!r} needs a target model")
