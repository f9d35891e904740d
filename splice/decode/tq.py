"""Value-guided decoding: Transfer Q*, with ARGS and CD as configurations (spec other.md §3).

:class:`RolloutValueScorer` estimates ``Q̂(s_t, z)`` for each candidate ``z`` by rolling out
``M`` continuations of ``[s_t, z]`` from a rollout policy and scoring the finished text with a
reward model; :class:`~splice.decode.rerank.RerankTopK` with ``weight = 1/α`` then picks
``argmax log π_sft(z | s_t) + Q̂ / α`` (§3.4). The four components stay separate (§3.4, unlike
the released scripts): proposer (π_sft top-k, the engine's proposer), rollout policy, target
reward ``r`` and baseline reward ``r_BL``.

* **TQ\\*, direct transfer** — rollouts from the aligned baseline ρ_BL (``r_BL = r``).
* **TQ\\*, indirect transfer** — also ``baseline_reward``: weights ``w_m ∝ exp((r − r_BL)/β)``,
  self-normalised by their mean over the ``M`` rollouts by default (needs ``M ≥ 2``, §3.3);
  ``is_normalization="none"`` keeps the code's raw weights (β = 2 there).
* **CD** — rollouts from π_sft itself (``Q^{π_sft}``).
* **ARGS** — no rollout (``horizon=0``): the reward of the partial sequence ``[s_t, z]``.

``horizon=None`` rolls out to EOS or ``max_rollout_tokens``; 20 is the released direct
script's budget. The rollouts run on the engine itself (plain decoding, KV-cached).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from splice.decode.base import Candidates
from splice.decode.engine import generate
from splice.decode.lm import CachedLM
from splice.decode.sampling import Sampling
from splice.errors import SpliceError

__all__ = ["RolloutValueScorer", "args_scorer", "cd_scorer", "tq_scorer"]

Reward = Callable[[Sequence[int], int], float]  # (all token ids, prompt length) → reward


class RolloutValueScorer:
    """``Q̂(s_t, z) = Σ_m w_m r(x, [y_<t, z, τ_m]) / M`` with ``τ_m`` from ``rollout_policy``."""

    def __init__(
        self,
        reward: Reward,
        rollout_policy: nn.Module | None = None,
        *,
        n_rollouts: int = 1,
        horizon: int | None = 20,
        max_rollout_tokens: int = 128,
        sampling: Sampling | None = None,
        baseline_reward: Reward | None = None,
        is_normalization: Literal["self", "none"] = "self",
        beta: float = 2.0,
        eos: Sequence[int] = (),
        seed: int = 42,
        name: str = "tq",
    ) -> None:
        if n_rollouts < 1:
            raise SpliceError(f"n_rollouts={n_rollouts} must be >= 1")
        if baseline_reward is not None and is_normalization == "self" and n_rollouts < 2:
            raise SpliceError(
                f"self-normalised importance weights with n_rollouts={n_rollouts} reduce to the "
                "plain reward (spec §3.3)",
                fix="use n_rollouts >= 2, or is_normalization='none'",
            )
        if horizon != 0 and rollout_policy is None:
            raise SpliceError("a rollout horizon needs a rollout policy", fix="or use horizon=0")
        self.reward, self.baseline_reward = reward, baseline_reward
        self.lm = CachedLM(rollout_policy, "rollout") if rollout_policy is not None else None
        self.m, self.horizon, self.cap = n_rollouts, horizon, max_rollout_tokens
        self.sampling = sampling or Sampling(temperature=0)
        self.norm, self.beta, self.eos, self.seed, self.name = (
            is_normalization, beta, tuple(eos), seed, name,
        )  # fmt: skip
        self.reward_calls = 0

    @property
    def calls(self) -> int:
        return self.reward_calls + (self.lm.calls if self.lm is not None else 0)

    def rollouts(self, ids: Sequence[int]) -> list[list[int]]:
        """``M`` completed token sequences starting with ``ids``."""
        if self.horizon == 0 or (ids and ids[-1] in self.eos):
            return [list(ids)] * self.m
        n = self.horizon if self.horizon is not None else self.cap
        outs = []
        for m in range(self.m):
            g = generate(ids, target=self.lm, sampling=self.sampling, max_new_tokens=n,
                         eos=self.eos, seed=self.seed + m)  # fmt: skip
            outs.append([*ids, *g.tokens])
        return outs

    def value(self, ids: Sequence[int], prompt_len: int) -> float:
        """Q̂ for the state-action ``ids`` (the candidate is its last token)."""
        seqs = self.rollouts(ids)
        r = [self.reward(s, prompt_len) for s in seqs]
        self.reward_calls += len(seqs)
        if self.baseline_reward is None:
            return sum(r) / len(r)
        rb = [self.baseline_reward(s, prompt_len) for s in seqs]
        self.reward_calls += len(seqs)
        w = [math.exp((a - b) / self.beta) for a, b in zip(r, rb, strict=True)]
        if self.norm == "self":
            mean_w = sum(w) / len(w)
            w = [x / mean_w for x in w]
        return sum(x * y for x, y in zip(w, r, strict=True)) / len(r)

    def score(self, ids: Sequence[int], prompt_len: int, cand: Candidates) -> Tensor:
        return torch.tensor([self.value([*ids, c], prompt_len) for c in cand.tokens.tolist()])


def args_scorer(reward: Reward) -> RolloutValueScorer:
    """ARGS: the reward of the partial sequence, no rollout."""
    return RolloutValueScorer(reward, None, horizon=0, name="args")


def cd_scorer(sft: nn.Module, reward: Reward, **kw: object) -> RolloutValueScorer:
    """Controlled decoding: ``Q^{π_sft}`` from rollouts of the SFT policy itself."""
    return RolloutValueScorer(reward, sft, name="cd", **kw)  # type: ignore[arg-type]


def tq_scorer(baseline: nn.Module, reward: Reward, **kw: object) -> RolloutValueScorer:
    """Transfer Q*: rollouts from the aligned baseline (pass ``baseline_reward`` for indirect)."""
    return RolloutValueScorer(reward, baseline, name="tq", **kw)  # type: ignore[arg-type]
