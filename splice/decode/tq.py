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
script's budget. The ``k·M`` rollouts of a step run as one batch from the rollout policy's
cached context (:meth:`CachedLM.rollout`). ``rollout_prompt`` gives the rollout policy its own
prompt (e.g. a prompted aligned baseline): it continues ``rollout_prompt + y_<t + z``, while
the reward still reads the policy's prompt and response.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from splice.decode.base import Candidates
from splice.decode.lm import CachedLM
from splice.decode.sampling import Sampling, warp
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
        rollout_prompt: Sequence[int] | None = None,
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
        self.prompt = list(rollout_prompt) if rollout_prompt is not None else None
        self.gen = torch.Generator().manual_seed(seed)
        self.reward_calls = 0

    @property
    def calls(self) -> int:
        return self.reward_calls + (self.lm.calls if self.lm is not None else 0)

    def rollouts(self, ids: Sequence[int]) -> list[list[int]]:
        """``M`` completed token sequences starting with ``ids``."""
        return self._batch(ids[:-1], [ids[-1]], len(ids))[0]

    def _batch(
        self, ids: Sequence[int], cands: Sequence[int], prompt_len: int
    ) -> list[list[list[int]]]:
        """Per candidate ``c``, ``M`` sequences ``[*ids, c, *τ_m]``; all ``k·M`` rollouts run
        as one batch from the cached context (spec §3.8's performance note)."""
        done = [[*ids, c] for c in cands]
        if self.horizon == 0:
            return [[d] * self.m for d in done]
        n = self.horizon if self.horizon is not None else self.cap
        ctx = [*self.prompt, *ids[prompt_len:]] if self.prompt is not None else list(ids)
        firsts = [c for c in cands for _ in range(self.m)]
        self.gen.manual_seed(self.seed)  # the same random numbers at every step and call
        tau = self.lm.rollout(ctx, firsts, n, self._pick).tolist()  # type: ignore[union-attr]
        out = []
        for i, c in enumerate(cands):
            rows = []
            for row in tau[i * self.m : (i + 1) * self.m]:
                stop = next((j for j, t in enumerate(row) if t in self.eos), None)
                rows.append([*ids, c] + ([] if c in self.eos else row[: _end(stop)]))
            out.append(rows)
        return out

    def _pick(self, logits: Tensor) -> Tensor:
        p = warp(logits, self.sampling)
        if self.sampling.greedy:
            return p.argmax(-1)
        return torch.multinomial(p, 1, generator=self.gen)[:, 0]

    def value(self, ids: Sequence[int], prompt_len: int) -> float:
        """Q̂ for the state-action ``ids`` (the candidate is its last token)."""
        return self._q(self._batch(ids[:-1], [ids[-1]], prompt_len)[0], prompt_len)

    def _q(self, seqs: list[list[int]], prompt_len: int) -> float:
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
        batch = self._batch(ids, cand.tokens.tolist(), prompt_len)
        return torch.tensor([self._q(seqs, prompt_len) for seqs in batch])


def _end(stop: int | None) -> int | None:
    return None if stop is None else stop + 1


def args_scorer(reward: Reward) -> RolloutValueScorer:
    """ARGS: the reward of the partial sequence, no rollout."""
    return RolloutValueScorer(reward, None, horizon=0, name="args")


def cd_scorer(sft: nn.Module, reward: Reward, **kw: object) -> RolloutValueScorer:
    """Controlled decoding: ``Q^{π_sft}`` from rollouts of the SFT policy itself."""
    return RolloutValueScorer(reward, sft, name="cd", **kw)  # type: ignore[arg-type]


def tq_scorer(baseline: nn.Module, reward: Reward, **kw: object) -> RolloutValueScorer:
    """Transfer Q*: rollouts from the aligned baseline (pass ``baseline_reward`` for indirect)."""
    return RolloutValueScorer(reward, baseline, name="tq", **kw)  # type: ignore[arg-type]
